"""SiLU-and-mul for gated MLPs: x = cat(gate, up) on the last dim -> silu(gate) * up."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import FLOAT_DTYPES, check_same_device, check_tensor, rows_per_program


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, num_rows, stride_x, stride_o, N: tl.constexpr,
                     BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < num_rows)[:, None] & (cols < N)[None, :]
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :]
    gate = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + N, mask=mask, other=0.0).to(tl.float32)
    # round after the activation like the two-op reference does
    act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :],
             (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """x: [..., 2 * d] -> [..., d]."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_same_device(x)
    if x.shape[-1] % 2:
        raise ValueError(f"last dim must be even (gate and up), got {x.shape[-1]}")
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    num_rows = x2.shape[0]
    if num_rows and d:
        block = min(block, triton.next_power_of_2(d))
        rows = rows_per_program(num_rows, block, x.device)
        _silu_mul_kernel[(triton.cdiv(num_rows, rows), triton.cdiv(d, block))](
            x2, out, num_rows, x2.stride(0), out.stride(0), N=d, BLOCK=block, ROWS=rows,
            num_warps=4)
    return out.view(*x.shape[:-1], d)
