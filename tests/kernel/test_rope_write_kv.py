"""RoPE and the KV-cache write in one kernel: the same bits as the two kernels one after the
other."""
from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, random_cache

from kernels.kv_write import kv_write
from kernels.rope import rope
from kernels.rope_cache import build_rope_cache
from kernels.rope_write_kv import rope_write_kv


def qkv_views(num_tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """q, k, v as the model passes them: views into one fused projection's output."""
    qkv = torch.randn(num_tokens, heads + 2 * kv_heads, head_dim, dtype=dtype, device=DEVICE)
    return qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (32, 8, 128, 16),
                                                                (4, 4, 96, 8), (6, 1, 80, 1)])
def test_same_bits_as_rope_then_kv_write(heads, kv_heads, head_dim, block_size, dtype):
    num_blocks, num_tokens = 16, 11
    cache = build_rope_cache(head_dim, 4096, 500000.0, None, DEVICE)
    positions = torch.randint(0, 4096, (num_tokens,), device=DEVICE)
    q, k, v = qkv_views(num_tokens, heads, kv_heads, head_dim, dtype)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[3] = slots[7] = -1  # padded rows of a captured batch write nothing
    k_cache, v_cache = random_cache(num_blocks, block_size, kv_heads, head_dim, dtype)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    q_out = rope_write_kv(positions, q, k, v, cache, k_cache, v_cache, slots)
    q_ref, k_rot = rope(positions, q, k, cache)
    kv_write(k_rot, v, ref_k, ref_v, slots)
    assert torch.equal(q_out, q_ref)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_inputs_stay_as_they_were_and_no_tokens_is_nothing():
    cache = build_rope_cache(64, 128, 10000.0, None, DEVICE)
    q, k, v = qkv_views(3, 4, 2, 64, torch.float32)
    before = [t.clone() for t in (q, k, v)]
    k_cache, v_cache = random_cache(2, 4, 2, 64, torch.float32)
    positions = torch.tensor([0, 5, 127], device=DEVICE)
    rope_write_kv(positions, q, k, v, cache, k_cache, v_cache,
                  torch.tensor([0, 3, 7], device=DEVICE))
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), before))
    cached = k_cache.clone()
    empty = rope_write_kv(positions[:0], q[:0], k[:0], v[:0], cache, k_cache, v_cache,
                          positions[:0])
    assert empty.shape == (0, 4, 64) and torch.equal(k_cache, cached)


def test_rejects_what_either_kernel_rejects():
    cache = build_rope_cache(64, 128, 10000.0, None, DEVICE)
    q, k, v = qkv_views(3, 4, 2, 64, torch.float32)
    k_cache, v_cache = random_cache(2, 4, 2, 64, torch.float32)
    positions = torch.tensor([0, 5, 127], device=DEVICE)
    with pytest.raises(ValueError, match="slot_mapping has 2 entries"):
        rope_write_kv(positions, q, k, v, cache, k_cache, v_cache, positions[:2])
    with pytest.raises(ValueError, match="disagree"):
        rope_write_kv(positions[:2], q, k, v, cache, k_cache, v_cache, positions)
    with pytest.raises(ValueError, match="must match cache dtype"):
        rope_write_kv(positions, q, k, v, cache, k_cache.half(), v_cache.half(), positions)
