"""FP8 (E4M3) matmul with row-wise scales: out = (a @ b^T) * a_scale * b_scale.

a: [M, K] E4M3 activations with one fp32 scale per row; b: [N, K] E4M3 weights with one fp32
scale per output channel. Each program computes a [BLOCK_M, BLOCK_N] tile of the output over
the whole of K into an fp32 accumulator: on Hopper the FP8 tensor cores add at reduced
precision, so the partial sums are promoted into fp32 every 128 products
(`max_num_imprecise_acc`, explicit because Triton's default on sm_90 never promotes), which
keeps the result as exact as the CUTLASS kernel behind `torch._scaled_mm` without fast
accumulation. The launcher's tile is `block_n` outputs wide and `block_k` deep (`TILES`): at
decode batch sizes the matmul only streams weights, so narrow tiles give every SM a share of
them, where `torch._scaled_mm`'s tiles are at least 64 x 128 with no split of K (for a
4,096-wide o_proj at 64 rows, 32 programs on a 132-SM GPU), and deep ones keep more weight
bytes in flight per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import FLOAT_DTYPES, check_same_device, check_tensor

FP8 = torch.float8_e4m3fn
TILES = ((16, 128), (32, 128), (64, 128), (128, 128), (64, 256), (128, 256))  # (block_n, block_k)


@triton.jit
def _fp8_matmul_kernel(a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, out_ptr, M, N, K, stride_a,
                       stride_b, stride_o, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    # the grid's first axis walks N: programs that share a row block run side by side
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + rows.to(tl.int64)[:, None] * stride_a + ks[None, :]
    b_tile = b_ptr + cols.to(tl.int64)[None, :] * stride_b + ks[:, None]
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = ks < K - k
        a = tl.load(a_tile + k, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_tile + k, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        # Hopper's FP8 tensor cores add at reduced precision: into fp32 every 128 products
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=128)
    a_scale = tl.load(a_scale_ptr + rows, mask=row_ok, other=0.0)
    b_scale = tl.load(b_scale_ptr + cols, mask=col_ok, other=0.0)
    out = acc * a_scale[:, None] * b_scale[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def fp8_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
               out_dtype: torch.dtype = torch.bfloat16, block_n: int = 64,
               block_k: int = 128) -> torch.Tensor:
    """a: [M, K] E4M3, a_scale: [M, 1] fp32; b: [N, K] E4M3, b_scale: [1, N] or [N, 1] fp32
    -> [M, N] in out_dtype."""
    check_tensor("a", a, dims=2, dtypes=(FP8,))
    check_tensor("b", b, dims=2, dtypes=(FP8,))
    (m, k), (n, k_b) = a.shape, b.shape
    if k != k_b:
        raise ValueError(f"a has {k} columns and b {k_b}")
    if a_scale.numel() != m or b_scale.numel() != n:
        raise ValueError(f"scales must hold {m} and {n} values, got {tuple(a_scale.shape)} and "
                         f"{tuple(b_scale.shape)}")
    if a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32:
        raise ValueError("scales must be float32")
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    if (block_n, block_k) not in TILES:
        raise ValueError(f"(block_n, block_k) must be one of {TILES}, got {(block_n, block_k)}")
    check_same_device(a, b, a_scale, b_scale)
    a_scale, b_scale = a_scale.contiguous().view(-1), b_scale.contiguous().view(-1)
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m and n:
        rows = 64 if m <= 64 else 128  # 64: one Hopper warpgroup's MMA
        big = rows == 128  # prefill-sized tiles: two warpgroups, fewer stages fit
        _fp8_matmul_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, rows))](
            a, b, a_scale, b_scale, out, m, n, k, a.stride(0), b.stride(0), out.stride(0),
            BLOCK_M=rows, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8 if big else 4,
            num_stages=3 if big else 4)
    return out


def fp8_matmul_reference(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                         b_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
                         ) -> torch.Tensor:
    """The same product in float64 from the dequantized operands, rounded once at the end."""
    out = (a.double() @ b.double().t()) * a_scale.double().view(-1, 1) * \
        b_scale.double().view(1, -1)
    return out.to(out_dtype)
