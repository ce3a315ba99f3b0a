"""FP8 serving quality: the real SmolLM2 with E4M3 weights and activations picks the unquantized
model's top-1 token at >= 1,000 teacher-forced positions of real text, prefill and decode path
(tests/core/top1.py); the measured agreement is printed.

On CUDA the reference is bf16, the dtype FP8 replaces there, and the bar is the 97% asked of
FP8 serving. On CPU both run in float32 (FP8's CPU path multiplies the same quantized values,
dequantized) and the bar is 85%: this 135M-parameter model has many near-ties, and E4M3 keeps 3
mantissa bits of every weight and activation. Its agreement here is 88.0% (1032/1172 positions),
and quantizing HF transformers' own SmolLM2 the same way outside our engine gives 88.0% too
(965/1097 prompt positions), so the gap is the format's, not the engine's. On an H200
(`_scaled_mm`, bf16 reference) it is 88.7% (1039/1172): below the GPU bar, which per-block
scales do not reach on this model either (README, FP8 weights).

An FP8 KV cache alone (E4M3 keys and values, scale 1, weights unquantized) agrees at 95.0%
(1113/1172 prefill, 76/80 decode) on CPU in float32; the bar is 90% on every device.
"""
from __future__ import annotations

import pytest
import torch
from top1 import measure

pytestmark = pytest.mark.slow

ON_GPU = torch.cuda.is_available()
DTYPE = "bfloat16" if ON_GPU else "float32"
THRESHOLD = 0.97 if ON_GPU else 0.85


def test_fp8_top1_agrees_with_unquantized(model_dir):
    config = {"model": model_dir, "max_model_len": 2048, "num_kv_blocks": 512, "dtype": DTYPE}
    agreement = measure(config, {"quantization": "fp8"}, {}, continuation=16)
    print(f"fp8 vs {DTYPE}: {agreement}")
    assert agreement.prefill_total >= 1000
    assert agreement.prefill / agreement.prefill_total >= THRESHOLD, agreement
    assert agreement.decode / agreement.decode_total >= THRESHOLD, agreement


def test_fp8_kv_cache_top1_agrees_with_unquantized(model_dir):
    """Keys and values rounded to E4M3 with a scale of 1. A scale of 1/16, which lifts small
    values out of E4M3's subnormals, gave 94.0% here: the 3 mantissa bits set the figure."""
    config = {"model": model_dir, "max_model_len": 2048, "num_kv_blocks": 512, "dtype": DTYPE}
    agreement = measure(config, {"kv_cache_dtype": "fp8"}, {}, continuation=16)
    print(f"fp8 KV cache vs {DTYPE}: {agreement}")
    assert agreement.prefill_total >= 1000
    assert agreement.prefill / agreement.prefill_total >= 0.90, agreement
    assert agreement.decode / agreement.decode_total >= 0.90, agreement
