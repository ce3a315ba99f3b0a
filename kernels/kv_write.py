"""Write one step's new keys and values into the paged cache by slot mapping.

Slot s is block s // block_size, offset s % block_size. A negative slot writes nothing: padded
rows of a captured decode batch use -1. An E4M3 cache (`kv_cache_dtype: fp8`) holds each value
rounded to E4M3 with a scale of 1, clamped to +-448.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_quant import to_element_type
from kernels.launch import KV_FP8, check_same_device, check_tensor, rows_per_program


@triton.jit
def _kv_write_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, num_rows,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr,
):
    # one row is one (token, kv head) pair
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < num_rows
    token = (rows // NUM_KV_HEADS).to(tl.int64)
    h = rows % NUM_KV_HEADS
    slot = tl.load(slot_mapping_ptr + token, mask=row_mask, other=-1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask = (row_mask & (slot >= 0))[:, None] & (d < HEAD_DIM)[None, :]
    slot = tl.maximum(slot, 0)
    block = (slot // BLOCK_SIZE)[:, None]
    offset = (slot % BLOCK_SIZE)[:, None]
    k = tl.load(k_ptr + token[:, None] * stride_kt + h[:, None] * stride_kh + d[None, :],
                mask=mask)
    v = tl.load(v_ptr + token[:, None] * stride_vt + h[:, None] * stride_vh + d[None, :],
                mask=mask)
    tl.store(k_cache_ptr + block * stride_kcb + offset * stride_kcs + h[:, None] * stride_kch
             + d[None, :], to_element_type(k, k_cache_ptr), mask=mask)
    tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vcs + h[:, None] * stride_vch
             + d[None, :], to_element_type(v, v_cache_ptr), mask=mask)


def check_kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, dims=3)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, dims=4)
    check_tensor("slot_mapping", slot_mapping, dims=1, dtypes=(torch.int64, torch.int32),
                 contiguous=True)
    check_same_device(k, v, k_cache, v_cache, slot_mapping)
    if k.shape != v.shape or k_cache.shape != v_cache.shape:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} or caches "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)} differ")
    if k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"k rows {tuple(k.shape[1:])} do not fit cache rows "
                         f"{tuple(k_cache.shape[2:])}")
    if k.dtype != v.dtype or k_cache.dtype != v_cache.dtype or \
            k_cache.dtype not in (k.dtype, KV_FP8):
        raise ValueError(f"k/v dtype {k.dtype} must match cache dtype {k_cache.dtype} "
                         f"(or the cache be {KV_FP8})")
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for "
                         f"{k.shape[0]} tokens")


def kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads,
    head_dim]; slot_mapping: [num_tokens] int64 (or int32)."""
    check_kv_write(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    num_rows = num_tokens * num_kv_heads
    if num_rows == 0:
        return
    rows = rows_per_program(num_rows, head_dim, k.device)
    _kv_write_kernel[(triton.cdiv(num_rows, rows),)](
        k, v, k_cache, v_cache, slot_mapping, num_rows,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1], ROWS=rows, num_warps=4,
    )
