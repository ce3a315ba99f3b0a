"""Fused residual add + RMSNorm over the last dim.

Rounds where the reference rounds (the sum to the input dtype, the normalised row before the
weight), so a bf16 model sees the same numbers from either backend.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import FLOAT_DTYPES, check_same_device, check_tensor, rows_per_program


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, eps, num_rows,
    stride_x, stride_r, stride_o, stride_ro,
    N: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < num_rows)[:, None] & (cols < N)[None, :]
    rows = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + rows * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + rows * stride_ro + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, 1) / N + eps)
    normed = (xf * inv_rms[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * stride_o + cols[None, :],
             (normed * w[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (and residual): [..., hidden]; returns (normed, new_residual) where new_residual is
    x + residual, or x itself without a residual."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, dims=1, dtypes=FLOAT_DTYPES, contiguous=True)
    hidden = x.shape[-1]
    if weight.shape[0] != hidden:
        raise ValueError(f"weight has {weight.shape[0]} entries for hidden size {hidden}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,))
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
        check_same_device(x, weight, residual)
    else:
        check_same_device(x, weight)
    x2 = x.reshape(-1, hidden)
    r2 = residual.reshape(-1, hidden) if residual is not None else x2
    out = torch.empty_like(x2)
    new_residual = torch.empty_like(x2) if residual is not None else x2
    num_rows = x2.shape[0]
    if num_rows:
        rows = rows_per_program(num_rows, hidden, x.device)
        _rms_norm_kernel[(triton.cdiv(num_rows, rows),)](
            x2, r2, weight, out, new_residual, eps, num_rows,
            x2.stride(0), r2.stride(0), out.stride(0), new_residual.stride(0),
            N=hidden, BLOCK=triton.next_power_of_2(hidden), ROWS=rows,
            HAS_RESIDUAL=residual is not None, num_warps=4 if hidden <= 4096 else 8,
        )
    return out.view(x.shape), (new_residual.view(x.shape) if residual is not None else x)
