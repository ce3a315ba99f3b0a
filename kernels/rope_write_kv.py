"""Rotary embedding and the paged-cache write of one step's keys and values, in one kernel.

The same numbers as `kernels.rope.rope` followed by `kernels.kv_write.kv_write`: the rotated key
is rounded to the cache dtype once and stored straight into its slot, so it never makes a round
trip through memory, and each layer launches one kernel instead of two (an E4M3 cache gets
what `kv_write` writes). A negative slot writes
no key or value (padded rows of a captured decode batch); their queries are rotated all the same.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_quant import to_element_type
from kernels.kv_write import check_kv_write
from kernels.rope import check_rope, rope_tile, rotate_heads, tokens_per_program


@triton.jit
def _rope_write_kv_kernel(
    positions_ptr, q_ptr, k_ptr, v_ptr, cos_sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    slot_mapping_ptr, num_tokens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_qot, stride_qoh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_cs,
    Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TOKENS: tl.constexpr,
):
    token, t_mask, cos, sin, j, j_mask = rope_tile(positions_ptr, cos_sin_ptr, num_tokens,
                                                   stride_cs, HALF, BLOCK_HALF, TOKENS)
    rotate_heads(q_ptr, q_out_ptr, token * stride_qt, token * stride_qot, t_mask, cos, sin, j,
                 j_mask, stride_qh, stride_qoh, Q_HEADS, BLOCK_QH, HALF)
    slot = tl.load(slot_mapping_ptr + token, mask=t_mask, other=-1).to(tl.int64)
    written = t_mask & (slot >= 0)
    slot = tl.maximum(slot, 0)
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    rotate_heads(k_ptr, k_cache_ptr, token * stride_kt, block * stride_kcb + offset * stride_kcs,
                 written, cos, sin, j, j_mask, stride_kh, stride_kch, K_HEADS, BLOCK_KH, HALF)
    # v is copied as it is, in the same two halves as the key
    h = tl.arange(0, BLOCK_KH)[None, :, None]
    mask = written[:, None, None] & (h < K_HEADS) & j_mask[None, None, :]
    v_row = v_ptr + token[:, None, None] * stride_vt + h * stride_vh + j[None, None, :]
    cache_row = v_cache_ptr + (block * stride_vcb + offset * stride_vcs)[:, None, None] \
        + h * stride_vch + j[None, None, :]
    tl.store(cache_row, to_element_type(tl.load(v_row, mask=mask), v_cache_ptr), mask=mask)
    tl.store(cache_row + HALF, to_element_type(tl.load(v_row + HALF, mask=mask), v_cache_ptr),
             mask=mask)


def rope_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> torch.Tensor:
    """positions: [num_tokens]; q: [num_tokens, heads, head_dim]; k, v: [num_tokens, kv_heads,
    head_dim]; caches: [num_blocks, block_size, kv_heads, head_dim]; slot_mapping: [num_tokens].
    Writes the rotated k and v into the caches by slot; returns the rotated q."""
    check_rope(positions, q, k, cos_sin_cache)
    check_kv_write(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_q_heads, head_dim = q.shape
    q_out = torch.empty_like(q)
    if num_tokens:
        half, tokens = head_dim // 2, tokens_per_program(q)
        _rope_write_kv_kernel[(triton.cdiv(num_tokens, tokens),)](
            positions, q, k, v, cos_sin_cache, q_out, k_cache, v_cache, slot_mapping, num_tokens,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            q_out.stride(0), q_out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), cos_sin_cache.stride(0),
            Q_HEADS=num_q_heads, K_HEADS=k.shape[1], BLOCK_QH=triton.next_power_of_2(num_q_heads),
            BLOCK_KH=triton.next_power_of_2(k.shape[1]), HALF=half,
            BLOCK_HALF=triton.next_power_of_2(half), BLOCK_SIZE=k_cache.shape[1], TOKENS=tokens,
            num_warps=4,
        )
    return q_out
