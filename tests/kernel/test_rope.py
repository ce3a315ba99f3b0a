"""Rotary embedding kernel against the reference."""
from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, tolerance

from kernels.reference import rope_ref
from kernels.rope import rope
from kernels.rope_cache import build_rope_cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (32, 8, 128),
                                                             (4, 4, 96)])
def test_rope_matches_reference(num_heads, num_kv_heads, head_dim, dtype):
    cache = build_rope_cache(head_dim, 4096, 500000.0, {"rope_type": "llama3", "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 1024}, DEVICE)
    positions = torch.tensor([0, 1, 17, 1023, 1024, 4095], device=DEVICE)
    q = torch.randn(len(positions), num_heads, head_dim, dtype=dtype, device=DEVICE)
    k = torch.randn(len(positions), num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    q_out, k_out = rope(positions, q, k, cache)
    q_ref, k_ref = rope_ref(positions, q, k, cache)
    torch.testing.assert_close(q_out, q_ref, **tolerance(dtype))
    torch.testing.assert_close(k_out, k_ref, **tolerance(dtype))


def test_rope_reads_strided_views_and_leaves_them_alone():
    """q and k arrive as views into one qkv projection."""
    cache = build_rope_cache(64, 128, 10000.0, None, DEVICE)
    qkv = torch.randn(5, 12, 64, device=DEVICE)
    before = qkv.clone()
    q, k = qkv[:, :8], qkv[:, 8:10]
    positions = torch.tensor([3, 0, 127, 64, 5], device=DEVICE, dtype=torch.int32)
    q_out, k_out = rope(positions, q, k, cache)
    q_ref, k_ref = rope_ref(positions.long(), q, k, cache)
    torch.testing.assert_close(q_out, q_ref, **tolerance(torch.float32))
    torch.testing.assert_close(k_out, k_ref, **tolerance(torch.float32))
    assert torch.equal(qkv, before)


def test_position_zero_is_identity():
    cache = build_rope_cache(64, 8, 10000.0, None, DEVICE)
    q = torch.randn(1, 2, 64, device=DEVICE)
    q_out, k_out = rope(torch.zeros(1, dtype=torch.int64, device=DEVICE), q, q[:, :1], cache)
    torch.testing.assert_close(q_out, q)
    torch.testing.assert_close(k_out, q[:, :1])


def test_rope_rejects_cache_of_wrong_width():
    cache = build_rope_cache(32, 8, 10000.0, None, DEVICE)
    q = torch.randn(1, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        rope(torch.zeros(1, dtype=torch.int64, device=DEVICE), q, q, cache)
