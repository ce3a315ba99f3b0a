"""Shared fixtures: the default model folder, prepared by `make model`."""
from __future__ import annotations

import os

import pytest
import torch

# Triton decides between compiling and interpreting when a @triton.jit function is defined, and
# any module collected before tests/kernel may import one: without a GPU,
# every kernel must run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

MODEL_DIR = os.environ.get("PAGODA_MODEL", "models/smollm2-135m-instruct")


@pytest.fixture(scope="session")
def model_dir() -> str:
    if not os.path.exists(os.path.join(MODEL_DIR, "model.safetensors")):
        pytest.fail(f"{MODEL_DIR} is missing: run `make model` first")
    return MODEL_DIR
