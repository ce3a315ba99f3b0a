"""bfloat16 serving quality: the real SmolLM2 in bf16 picks float32's top-1 token almost always
(teacher-forced over real text, both the prefill and the decode path; tests/core/top1.py)."""
from __future__ import annotations

import pytest
from top1 import measure

pytestmark = pytest.mark.slow


def test_bf16_top1_agrees_with_float32(model_dir):
    config = {"model": model_dir, "max_model_len": 2048, "num_kv_blocks": 512}
    agreement = measure(config, {"dtype": "bfloat16"}, {"dtype": "float32"}, continuation=48)
    assert agreement.prefill_total >= 1000
    assert agreement.prefill / agreement.prefill_total >= 0.97, agreement
    assert agreement.decode / agreement.decode_total >= 0.97, agreement
