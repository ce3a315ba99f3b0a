"""Paged varlen causal prefill against the reference, with and without a cached prefix."""
from __future__ import annotations

import pytest
import torch
from kernel_inputs import ATTN_DTYPES, DEVICE, random_block_tables, random_cache, tolerance

from kernels.paged_prefill import paged_prefill
from kernels.reference import paged_prefill_ref

SHAPES = [(1, 64, 16), (3, 128, 8), (8, 64, 32), (3, 64, 12)]


def run_case(group: int, head_dim: int, block_size: int, dtype: torch.dtype,
             query_lens: list[int], seq_lens: list[int], num_kv_heads: int = 1,
             block_m: int = 16, block_n: int = 16) -> None:
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 2
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    tables = random_block_tables(seq_lens, block_size, num_blocks)
    starts = torch.tensor([0] + query_lens, device=DEVICE).cumsum(0).to(torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(query_lens), num_kv_heads * group, head_dim, dtype=dtype, device=DEVICE)
    scale = head_dim ** -0.5
    out = paged_prefill(q, k_cache, v_cache, starts, lens, tables, scale,
                        max_query_len=max(query_lens), block_m=block_m, block_n=block_n)
    ref = paged_prefill_ref(q, k_cache, v_cache, starts, lens, tables, scale)
    torch.testing.assert_close(out, ref, **tolerance(dtype))


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("group,head_dim,block_size", SHAPES)
def test_prefill_from_empty_cache(group, head_dim, block_size, dtype):
    # whole prompts: one token, one past a block boundary, one spanning several q tiles
    query_lens = [1, block_size + 1, 37]
    run_case(group, head_dim, block_size, dtype, query_lens, query_lens)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("group,head_dim,block_size", SHAPES)
def test_prefill_after_cached_prefix(group, head_dim, block_size, dtype):
    """Chunked prefill / prefix hits: new tokens start mid-block after a cached prefix; a
    decode row (query length 1) rides in the same batch."""
    query_lens = [5, 1, 20, 16]
    seq_lens = [block_size + 5, 30, 20 + 2 * block_size + 3, 16 + block_size]
    run_case(group, head_dim, block_size, dtype, query_lens, seq_lens)


@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16), (64, 64)])
def test_prefill_tile_shapes(block_m, block_n):
    run_case(3, 64, 16, torch.float32, [33, 7, 64], [40, 7, 100], num_kv_heads=2,
             block_m=block_m, block_n=block_n)


def test_prefill_rejects_mismatched_metadata():
    k_cache, v_cache = random_cache(4, 16, 1, 64, torch.float32)
    q = torch.randn(5, 2, 64, device=DEVICE)
    starts = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([5, 3], dtype=torch.int32, device=DEVICE)
    tables = torch.zeros(2, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_prefill(q, k_cache, v_cache, starts, lens, tables, 0.1, max_query_len=5)
