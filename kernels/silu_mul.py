"""SiLU-and-mul for gated MLPs: x = cat(gate, up) on the last dim -> silu(gate) * up.

`silu_mul_fp8` writes the product as E4M3 values and a per-row scale, for an FP8 linear layer:
the row rounded to the input dtype, then quantized as `fp8_quant.quantize_rows` does, bit for
bit. A row's scale needs all of it, so there one program holds a whole row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_quant import FP8, MAX_WIDTH, e4m3_scale, round_to_e4m3, row_warps
from kernels.launch import FLOAT_DTYPES, check_same_device, check_tensor, rows_per_program


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, scale_ptr, num_rows, stride_x, stride_o, N: tl.constexpr,
                     BLOCK: tl.constexpr, ROWS: tl.constexpr, FP8_OUT: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < num_rows)[:, None] & (cols < N)[None, :]
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :]
    gate = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + N, mask=mask, other=0.0).to(tl.float32)
    # round after the activation like the two-op reference does
    act = (gate * tl.sigmoid(gate)).to(x_ptr.dtype.element_ty).to(tl.float32)
    out = (act * up).to(x_ptr.dtype.element_ty)
    if FP8_OUT:  # BLOCK >= N: the program holds whole rows
        out = out.to(tl.float32)
        scale = e4m3_scale(tl.max(tl.abs(out), 1))
        out = round_to_e4m3(out, scale[:, None])
        tl.store(scale_ptr + rows, scale, mask=rows < num_rows)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor) -> int:
    """Half the last dim: the width of the output."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_same_device(x)
    if x.shape[-1] % 2:
        raise ValueError(f"last dim must be even (gate and up), got {x.shape[-1]}")
    return x.shape[-1] // 2


def silu_mul(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """x: [..., 2 * d] -> [..., d]."""
    d = _check(x)
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    num_rows = x2.shape[0]
    if num_rows and d:
        block = min(block, triton.next_power_of_2(d))
        rows = rows_per_program(num_rows, block, x.device)
        _silu_mul_kernel[(triton.cdiv(num_rows, rows), triton.cdiv(d, block))](
            x2, out, out, num_rows, x2.stride(0), out.stride(0), N=d, BLOCK=block, ROWS=rows,
            FP8_OUT=False, num_warps=4)
    return out.view(*x.shape[:-1], d)


def silu_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., 2 * d] -> (E4M3 values [..., d], fp32 scales [..., 1]): `quantize_rows` of
    silu_mul(x), for d up to MAX_WIDTH."""
    d = _check(x)
    if d > MAX_WIDTH:
        raise ValueError(f"rows of {d} values are wider than {MAX_WIDTH}")
    x2 = x.reshape(-1, x.shape[-1])
    num_rows = x2.shape[0]
    out = torch.empty(num_rows, d, dtype=FP8, device=x.device)
    scale = torch.empty(num_rows, 1, dtype=torch.float32, device=x.device)
    if num_rows and d:
        block = triton.next_power_of_2(d)
        rows = rows_per_program(num_rows, block, x.device)
        _silu_mul_kernel[(triton.cdiv(num_rows, rows), 1)](
            x2, out, scale, num_rows, x2.stride(0), out.stride(0), N=d, BLOCK=block, ROWS=rows,
            FP8_OUT=True, num_warps=row_warps(block))
    return out.view(*x.shape[:-1], d), scale.view(*x.shape[:-1], 1)
