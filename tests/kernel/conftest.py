"""Kernel tests run on the GPU when there is one, else on CPU under the Triton interpreter."""
from __future__ import annotations

import os
import random

import pytest
import torch

SEED = int(os.environ.get("KERNEL_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config) -> str:
    device = "cuda" if torch.cuda.is_available() else "cpu (TRITON_INTERPRET=1)"
    return f"kernel tests on {device}, seed {SEED} (set KERNEL_TEST_SEED to repeat)"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(SEED)
