"""Per-row dynamic FP8 (E4M3) quantization in one kernel: each row's largest magnitude maps to
448, its scale is amax * fp32(1/448), and values are x / scale (IEEE division), clamped and
rounded to E4M3. The same numbers as `workers/engine/fp8.quantize_rows`, which in PyTorch
takes about nine kernels per call: on a GPU those small launches cost more than FP8 weights
save at decode batch sizes. `e4m3_scale` and `round_to_e4m3` are the quantization itself,
called too by the RMSNorm and SiLU-mul kernels that write E4M3 rows, and, through
`to_element_type`, by the kernels that write keys and values into an FP8 KV cache.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import FLOAT_DTYPES, check_same_device, check_tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = tl.constexpr(448.0)  # a kernel reads only constexpr globals
MIN_AMAX = tl.constexpr(1e-12)  # keeps the scale of an all-zero row positive
MAX_WIDTH = 16384  # a row is held whole in registers


@triton.jit
def e4m3_scale(amax):
    """A row's fp32 scale from its largest magnitude, which maps to 448."""
    return tl.maximum(amax, MIN_AMAX) * (1.0 / FP8_MAX)


@triton.jit
def round_to_e4m3(x, scale):
    """x / scale (IEEE division) clamped to +-448 and rounded to the E4M3 grid, ties to even,
    still in fp32; the kernels that write E4M3 call this, so they all round alike."""
    y = tl.math.div_rn(x, tl.zeros_like(x) + scale)
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    # round here so the cast to E4M3 after it is exact on every backend
    # (Triton's interpreter rounds a carry out of the mantissa wrongly)
    bits = y.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000)  # 3 mantissa bits kept
    steps = tl.abs(y) * 512.0 + 8388608.0 - 8388608.0  # below 2^-6 the grid step is 2^-9
    subnormal = (steps / 512.0).to(tl.uint32, bitcast=True) | (bits & 0x80000000)
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal).to(tl.float32, bitcast=True)


@triton.jit
def to_element_type(x, ptr):
    """x in the element type `ptr` points to; into E4M3 (an FP8 KV cache, whose scale is 1)
    clamped to +-448 and rounded as `kernels.reference.to_cache_dtype` rounds."""
    if ptr.dtype.element_ty == tl.float8e4nv:
        x = round_to_e4m3(x.to(tl.float32), 1.0)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, stride_x, stride_o,
                          N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = e4m3_scale(tl.max(tl.abs(x), axis=0))
    y = round_to_e4m3(x, scale)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def row_warps(block: int) -> int:
    """Warps for a program that holds a whole row of `block` values (a power of two)."""
    return min(16, max(4, block // 1024))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [rows, width] -> (E4M3 values [rows, width], fp32 scales [rows, 1])."""
    check_tensor("x", x, dims=2, dtypes=FLOAT_DTYPES)
    check_same_device(x)
    rows, width = x.shape
    if width > MAX_WIDTH:
        raise ValueError(f"rows of {width} values are wider than {MAX_WIDTH}")
    out = torch.empty(rows, width, dtype=FP8, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(width)
        _quantize_rows_kernel[(rows,)](x, out, scale, x.stride(0), out.stride(0), N=width,
                                       BLOCK=block, num_warps=row_warps(block))
    return out, scale
