"""Writing K/V into the paged cache by slot mapping."""
from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, random_cache

from kernels.kv_write import kv_write
from kernels.reference import kv_write_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(1, 64, 16), (3, 128, 8),
                                                              (8, 64, 1), (2, 80, 12)])
def test_kv_write_matches_reference(num_kv_heads, head_dim, block_size, dtype):
    num_blocks, num_tokens = 12, 9
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    # distinct slots across block boundaries, first and last slot included
    last = num_blocks * block_size - 1
    middle = torch.randperm(last - 1, device=DEVICE)[: num_tokens - 2] + 1
    slots = torch.cat([middle.new_zeros(1), middle, middle.new_full((1,), last)])
    k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v = torch.randn_like(k)
    kv_write(k, v, k_cache, v_cache, slots)
    kv_write_ref(k, v, ref_k, ref_v, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_negative_slots_write_nothing():
    k_cache, v_cache = random_cache(2, 4, 2, 64, torch.float32)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    k = torch.randn(3, 2, 64, device=DEVICE)
    slots = torch.tensor([5, -1, -1], device=DEVICE)
    kv_write(k, k.neg(), k_cache, v_cache, slots)
    assert torch.equal(k_cache[1, 1], k[0]) and torch.equal(v_cache[1, 1], -k[0])
    k_cache[1, 1], v_cache[1, 1] = before_k[1, 1], before_v[1, 1]
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)


def test_strided_inputs_from_a_fused_qkv():
    """k and v are usually views into one qkv projection, not contiguous tensors."""
    k_cache, v_cache = random_cache(3, 16, 2, 64, torch.float16)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    qkv = torch.randn(5, 8, 64, dtype=torch.float16, device=DEVICE)
    k, v = qkv[:, 4:6], qkv[:, 6:8]
    slots = torch.tensor([3, 17, 18, 40, 47], device=DEVICE)
    kv_write(k, v, k_cache, v_cache, slots)
    kv_write_ref(k, v, ref_k, ref_v, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_kv_write_rejects_shape_mismatch():
    k_cache, v_cache = random_cache(2, 4, 2, 64, torch.float32)
    k = torch.randn(3, 4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="do not fit"):
        kv_write(k, k, k_cache, v_cache, torch.zeros(3, dtype=torch.int64, device=DEVICE))
