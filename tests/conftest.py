"""Shared fixtures: the default model folder, prepared by `make model`."""
from __future__ import annotations

import os

import pytest

MODEL_DIR = os.environ.get("PAGODA_MODEL", "models/smollm2-135m-instruct")


@pytest.fixture(scope="session")
def model_dir() -> str:
    if not os.path.exists(os.path.join(MODEL_DIR, "model.safetensors")):
        pytest.fail(f"{MODEL_DIR} is missing: run `make model` first")
    return MODEL_DIR
