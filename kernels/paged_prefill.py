"""Paged attention for prefill: variable-length causal attention over a flattened batch.

Sequence i owns query rows query_start_loc[i]:[i+1]; those are its newest tokens, so query row
j sits at position seq_len - query_len + j and attends every key up to and including itself.
Keys and values (the cached prefix and the new tokens, already written by `kv_write`) are read
through the block table, which serves chunked prefill and prefix caching with one kernel.
A program takes a tile of query tokens times all query heads of one KV head (row r is token
r // GROUP, head r % GROUP), so each key and value tile feeds the whole GQA group.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import check_cache, check_same_device, check_tensor, dot_precision
from kernels.paged_decode import LOG2E


@triton.jit
def _attend_tile(acc, l_i, m_i, q, tile, kv_end, pos, table, k_base, v_base, d, d_mask,
                 stride_kb, stride_ks, stride_vb, stride_vs, scale_log2,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 PRECISION: tl.constexpr):
    """One online-softmax update with keys tile..tile+BLOCK_N; MASKED for the causal edge."""
    toks = tile + tl.arange(0, BLOCK_N)
    if MASKED:
        t_mask = toks < kv_end
        block = tl.load(table + toks // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        kv_mask = t_mask[:, None] & d_mask[None, :]
    else:
        block = tl.load(table + toks // BLOCK_SIZE).to(tl.int64)
        kv_mask = d_mask[None, :]
    offset = toks % BLOCK_SIZE
    k = tl.load(k_base + block[:, None] * stride_kb + offset[:, None] * stride_ks + d[None, :],
                mask=kv_mask, other=0.0).to(q.dtype)
    v = tl.load(v_base + block[:, None] * stride_vb + offset[:, None] * stride_vs + d[None, :],
                mask=kv_mask, other=0.0).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    if MASKED:
        s = tl.where((toks[None, :] <= pos[:, None]) & t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # padding rows may see no key in a tile; keep their max finite
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = m_new
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, out_ptr,
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TOKENS: tl.constexpr, PRECISION: tl.constexpr,
):
    m_tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    r = tl.arange(0, BLOCK_M)
    rows = m_tile * TOKENS + r // GROUP  # query index within this sequence
    head = kv_head * GROUP + r % GROUP
    row_mask = (rows < q_len) & (r < TOKENS * GROUP)
    pos = ctx_len + rows
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head[:, None] * stride_qh
                + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # a tile past this sequence's queries reads nothing
    kv_end = tl.where(m_tile * TOKENS < q_len,
                      tl.minimum(seq_len, ctx_len + (m_tile + 1) * TOKENS), 0)
    # keys before the tile's first query position are visible to every row: no mask there
    full_end = tl.minimum((ctx_len + m_tile * TOKENS + 1) // BLOCK_N * BLOCK_N, kv_end)
    table = block_tables_ptr + seq * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    for tile in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, tile, kv_end, pos, table, k_base, v_base,
                                     d, d_mask, stride_kb, stride_ks, stride_vb, stride_vs,
                                     scale_log2, BLOCK_SIZE, BLOCK_N, False, PRECISION)
    for tile in range(full_end, kv_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, tile, kv_end, pos, table, k_base, v_base,
                                     d, d_mask, stride_kb, stride_ks, stride_vb, stride_vs,
                                     scale_log2, BLOCK_SIZE, BLOCK_N, True, PRECISION)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head[:, None] * stride_oh
             + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                  block_tables: torch.Tensor, scale: float, max_query_len: int,
                  out: torch.Tensor | None = None, block_m: int = 64, block_n: int = 64,
                  num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim]; query_start_loc: [num_seqs + 1] int32;
    seq_lens: [num_seqs] int32 (context length after this step, at least the query length);
    block_tables: [num_seqs, max_blocks] int32; max_query_len sizes the grid.
    """
    check_tensor("q", q, dims=3, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    check_cache(k_cache, v_cache, q)
    check_tensor("query_start_loc", query_start_loc, dims=1, dtypes=(torch.int32, torch.int64),
                 contiguous=True)
    check_tensor("seq_lens", seq_lens, dims=1, dtypes=(torch.int32, torch.int64), contiguous=True)
    check_tensor("block_tables", block_tables, dims=2, dtypes=(torch.int32, torch.int64))
    check_same_device(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables)
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_seqs + 1 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"query_start_loc needs {num_seqs + 1} entries and block_tables "
                         f"{num_seqs} rows, got {query_start_loc.shape[0]} and "
                         f"{block_tables.shape[0]}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous along blocks")
    if max_query_len < 0:
        raise ValueError(f"max_query_len must be non-negative, got {max_query_len}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride(2) != 1 or out.dtype != q.dtype:
        raise ValueError(f"out must match q {tuple(q.shape)} {q.dtype} with contiguous head_dim")
    num_heads, head_dim = q.shape[1], q.shape[2]
    if num_seqs == 0 or max_query_len == 0:
        return out
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_m = max(min(block_m, triton.next_power_of_2(max_query_len * group)), 16,
                  triton.next_power_of_2(group))
    tokens = block_m // group
    grid = (triton.cdiv(max_query_len, tokens), num_seqs, num_kv_heads)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, TOKENS=tokens, PRECISION=dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
