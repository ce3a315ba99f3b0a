"""Fused residual add + RMSNorm over the last dim; `rms_norm_fp8` writes the normed row as E4M3
values and a per-row scale instead, for an FP8 linear layer.

Rounds where the reference rounds (the sum to the input dtype, the normalised row before the
weight), so a bf16 model sees the same numbers from either backend. The E4M3 row is the normed
row rounded to the input dtype, then quantized as `fp8_quant.quantize_rows` does: bit for bit
what the two kernels give one after the other.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_quant import FP8, e4m3_scale, round_to_e4m3
from kernels.launch import FLOAT_DTYPES, check_same_device, check_tensor, rows_per_program


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, scale_ptr, residual_out_ptr, eps, num_rows,
    stride_x, stride_r, stride_o, stride_ro,
    N: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    FP8_OUT: tl.constexpr,
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
    out = (normed * w[None, :]).to(x_ptr.dtype.element_ty)
    if FP8_OUT:
        out = out.to(tl.float32)
        scale = e4m3_scale(tl.max(tl.abs(out), 1, keep_dims=True))
        out = round_to_e4m3(out, scale)
        tl.store(scale_ptr + rows, scale, mask=rows < num_rows)
    tl.store(out_ptr + rows * stride_o + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)


def _launch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
            fp8_out: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(out [rows, hidden], scale [rows, 1] with fp8_out else None, new_residual)."""
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
    num_rows = x2.shape[0]
    out = torch.empty_like(x2, dtype=FP8 if fp8_out else x.dtype)
    scale = torch.empty(num_rows, 1, dtype=torch.float32, device=x.device) if fp8_out else None
    new_residual = torch.empty_like(x2) if residual is not None else x2
    if num_rows:
        rows = rows_per_program(num_rows, hidden, x.device)
        _rms_norm_kernel[(triton.cdiv(num_rows, rows),)](
            x2, r2, weight, out, out if scale is None else scale, new_residual, eps, num_rows,
            x2.stride(0), r2.stride(0), out.stride(0), new_residual.stride(0),
            N=hidden, BLOCK=triton.next_power_of_2(hidden), ROWS=rows,
            HAS_RESIDUAL=residual is not None, FP8_OUT=fp8_out,
            num_warps=4 if hidden <= 4096 else 8,
        )
    return out, scale, new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (and residual): [..., hidden]; returns (normed, new_residual) where new_residual is
    x + residual, or x itself without a residual."""
    out, _, new_residual = _launch(x, weight, eps, residual, fp8_out=False)
    return out.view(x.shape), (new_residual.view(x.shape) if residual is not None else x)


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (and residual): [..., hidden]; returns (E4M3 values [..., hidden], fp32 scales
    [..., 1], new_residual): `quantize_rows` of rms_norm's normed row, and its new_residual."""
    values, scale, new_residual = _launch(x, weight, eps, residual, fp8_out=True)
    assert scale is not None
    return (values.view(x.shape), scale.view(*x.shape[:-1], 1),
            new_residual.view(x.shape) if residual is not None else x)
