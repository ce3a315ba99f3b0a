"""Shared by the kernel launchers: argument checks (ValueError saying what is wrong) and tiling."""
from __future__ import annotations

import os

import torch
import triton

from kernels.reference import KV_FP8

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, t: torch.Tensor, dims: int | None = None,
                 dtypes: tuple[torch.dtype, ...] | None = None, contiguous: bool = False) -> None:
    """Rank and dtype, and a unit stride on the last dim (every kernel reads rows as vectors)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} dtype must be one of {dtypes}, got {t.dtype}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit stride on its last dim, got {t.stride()}")


def check_same_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"tensors must share one device, got {device} and {t.device}")
    # Triton picks its interpreter when it is imported; kernels/__init__.py sets it without CUDA
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"Triton kernels need CUDA tensors (got {device}), or TRITON_INTERPRET=1 "
                         "set before triton is imported")


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, q: torch.Tensor) -> None:
    """Caches: [num_blocks, block_size, num_kv_heads, head_dim] in q's dtype or E4M3;
    q: [tokens, heads, head_dim]."""
    check_tensor("k_cache", k_cache, dims=4, dtypes=(*FLOAT_DTYPES, KV_FP8))
    check_tensor("v_cache", v_cache, dims=4, dtypes=(*FLOAT_DTYPES, KV_FP8))
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} "
                         "differ")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (q.dtype, KV_FP8):
        raise ValueError(f"cache dtype {k_cache.dtype} must match q dtype {q.dtype} "
                         f"(or be {KV_FP8})")
    if k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"head_dim of q ({q.shape[2]}) and cache ({k_cache.shape[3]}) differ")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"num_heads {q.shape[1]} is not a multiple of num_kv_heads "
                         f"{k_cache.shape[2]}")


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise go through tf32 on the GPU and lose ~3 digits
    return "ieee" if dtype == torch.float32 else "tf32"


def rows_per_program(num_rows: int, row_width: int, device: torch.device) -> int:
    """Rows one program of a row-wise kernel handles (a power of two)."""
    if device.type != "cuda":
        # the interpreter runs programs one at a time in Python: few, wide programs
        return min(64, triton.next_power_of_2(max(num_rows, 1)))
    # small rows share a program so each moves at least ~4 KiB
    return max(1, min(16, 2048 // triton.next_power_of_2(row_width)))
