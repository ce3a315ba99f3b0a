"""An FP8 KV cache (`kv_cache_dtype: fp8`): E4M3 keys and values with a scale of 1.

The writing kernels store what the torch reference stores, bit for bit: each value clamped to
+-448 and rounded to E4M3, ties to even. The attention kernels read the cache in the queries'
dtype and match the reference's fp32 attention over the same E4M3 values."""
from __future__ import annotations

import pytest
import torch
from kernel_inputs import ATTN_DTYPES, DEVICE, random_block_tables, tolerance

from kernels.kv_write import kv_write
from kernels.paged_decode import paged_decode
from kernels.paged_prefill import paged_prefill
from kernels.reference import KV_FP8, kv_write_ref, paged_decode_ref, paged_prefill_ref
from kernels.rope import rope
from kernels.rope_cache import build_rope_cache
from kernels.rope_write_kv import rope_write_kv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def fp8_cache(num_blocks: int, block_size: int, kv_heads: int, head_dim: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return tuple((torch.randn(shape, device=DEVICE) * 4).to(KV_FP8) for _ in range(2))


def wide_range(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Values from E4M3's subnormals (below 2^-6) to past its largest (448), both signs."""
    magnitude = torch.exp2(torch.empty(shape, device=DEVICE).uniform_(-12, 11))
    return (magnitude * torch.randn(shape, device=DEVICE).sign()).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_write_stores_the_references_e4m3_bits(dtype):
    num_blocks, block_size, kv_heads, head_dim, num_tokens = 6, 8, 3, 80, 13
    k_cache, v_cache = fp8_cache(num_blocks, block_size, kv_heads, head_dim)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[4] = -1  # a padded row writes nothing
    k = wide_range((num_tokens, kv_heads, head_dim), dtype)
    v = wide_range((num_tokens, kv_heads, head_dim), dtype)
    kv_write(k, v, k_cache, v_cache, slots)
    kv_write_ref(k, v, ref_k, ref_v, slots)
    assert same_bits(k_cache, ref_k) and same_bits(v_cache, ref_v)
    assert k_cache.float().abs().max() == 448  # saturated, not NaN


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv_stores_what_rope_then_kv_write_store(dtype):
    num_blocks, block_size, heads, kv_heads, head_dim, num_tokens = 8, 16, 8, 2, 64, 11
    cache = build_rope_cache(head_dim, 4096, 500000.0, None, DEVICE)
    positions = torch.randint(0, 4096, (num_tokens,), device=DEVICE)
    qkv = wide_range((num_tokens, heads + 2 * kv_heads, head_dim), dtype)
    q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[2] = -1
    k_cache, v_cache = fp8_cache(num_blocks, block_size, kv_heads, head_dim)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    q_out = rope_write_kv(positions, q, k, v, cache, k_cache, v_cache, slots)
    q_ref, k_rot = rope(positions, q, k, cache)
    kv_write(k_rot, v, ref_k, ref_v, slots)
    assert torch.equal(q_out, q_ref)
    assert same_bits(k_cache, ref_k) and same_bits(v_cache, ref_v)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
def test_paged_decode_reads_an_e4m3_cache(dtype):
    block_size, kv_heads, group, head_dim = 16, 2, 4, 64
    seq_lens = [1, 16, 17, 53]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 2
    k_cache, v_cache = fp8_cache(num_blocks, block_size, kv_heads, head_dim)
    tables = random_block_tables(seq_lens, block_size, num_blocks)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(seq_lens), kv_heads * group, head_dim, dtype=dtype, device=DEVICE)
    for splits in (1, 3):
        out = paged_decode(q, k_cache, v_cache, tables, lens, head_dim ** -0.5,
                           max_seq_len=max(seq_lens), num_splits=splits)
        ref = paged_decode_ref(q, k_cache, v_cache, tables, lens, head_dim ** -0.5)
        torch.testing.assert_close(out, ref, **tolerance(dtype))


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
def test_paged_prefill_reads_an_e4m3_cache(dtype):
    block_size, kv_heads, group, head_dim = 8, 2, 3, 64
    query_lens, seq_lens = [9, 1, 5], [9, 30, 21]  # a prompt, a decode, a chunk after a prefix
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 2
    k_cache, v_cache = fp8_cache(num_blocks, block_size, kv_heads, head_dim)
    tables = random_block_tables(seq_lens, block_size, num_blocks)
    starts = torch.tensor([0, 9, 10, 15], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(query_lens), kv_heads * group, head_dim, dtype=dtype, device=DEVICE)
    out = paged_prefill(q, k_cache, v_cache, starts, lens, tables, head_dim ** -0.5,
                        max_query_len=max(query_lens))
    ref = paged_prefill_ref(q, k_cache, v_cache, starts, lens, tables, head_dim ** -0.5)
    torch.testing.assert_close(out, ref, **tolerance(dtype))


def test_rejects_caches_of_two_dtypes():
    k_cache, v_cache = fp8_cache(2, 4, 2, 64)
    k = torch.randn(3, 2, 64, dtype=torch.float16, device=DEVICE)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="must match cache dtype"):
        kv_write(k, k, k_cache, v_cache.half(), slots)
    q = torch.randn(1, 4, 64, dtype=torch.float16, device=DEVICE)
    tables = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="must match q dtype"):
        paged_decode(q, k_cache, v_cache.half(), tables, slots[:1].int(), 0.125, max_seq_len=4)
