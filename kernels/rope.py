"""Rotary position embedding, neox style (rotate-half), over the cache of `kernels.rope_cache`."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_quant import to_element_type
from kernels.launch import FLOAT_DTYPES, check_same_device, check_tensor, rows_per_program


@triton.jit
def rope_tile(positions_ptr, cos_sin_ptr, num_tokens, stride_cs, HALF: tl.constexpr,
              BLOCK_HALF: tl.constexpr, TOKENS: tl.constexpr):
    """This program's tile of tokens and their mask; the cos and sin of their positions
    [TOKENS, 1, BLOCK_HALF], read once per token and shared by every q and k head; and the
    half-dim offsets j with their mask."""
    token = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
    t_mask = token < num_tokens
    token = token.to(tl.int64)
    pos = tl.load(positions_ptr + token, mask=t_mask, other=0).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    j_mask = j < HALF
    cs_mask = t_mask[:, None] & j_mask[None, :]
    cs_row = cos_sin_ptr + pos[:, None] * stride_cs + j[None, :]
    cos = tl.load(cs_row, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    sin = tl.load(cs_row + HALF, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    return token, t_mask, cos, sin, j, j_mask


@triton.jit
def rotate_heads(x_ptr, out_ptr, x_rows, o_rows, t_mask, cos, sin, j, j_mask, stride_xh,
                 stride_oh, HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    """Rotates all heads of a tile of tokens [TOKENS, BLOCK_H, BLOCK_HALF]; x_rows and o_rows
    are each token's offset in the input and output."""
    h = tl.arange(0, BLOCK_H)[None, :, None]
    mask = t_mask[:, None, None] & (h < HEADS) & j_mask[None, None, :]
    x_row = x_ptr + x_rows[:, None, None] + h * stride_xh + j[None, None, :]
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
    o_row = out_ptr + o_rows[:, None, None] + h * stride_oh + j[None, None, :]
    # rounded to the input's dtype first: an E4M3 cache gets what rope, then kv_write, write
    x_type = x_ptr.dtype.element_ty
    tl.store(o_row, to_element_type((x1 * cos - x2 * sin).to(x_type), out_ptr), mask=mask)
    tl.store(o_row + HALF, to_element_type((x2 * cos + x1 * sin).to(x_type), out_ptr), mask=mask)


@triton.jit
def _rope_kernel(
    positions_ptr, q_ptr, k_ptr, cos_sin_ptr, q_out_ptr, k_out_ptr, num_tokens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cs,
    Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, TOKENS: tl.constexpr,
):
    token, t_mask, cos, sin, j, j_mask = rope_tile(positions_ptr, cos_sin_ptr, num_tokens,
                                                   stride_cs, HALF, BLOCK_HALF, TOKENS)
    rotate_heads(q_ptr, q_out_ptr, token * stride_qt, token * stride_qot, t_mask, cos, sin, j,
                 j_mask, stride_qh, stride_qoh, Q_HEADS, BLOCK_QH, HALF)
    rotate_heads(k_ptr, k_out_ptr, token * stride_kt, token * stride_kot, t_mask, cos, sin, j,
                 j_mask, stride_kh, stride_koh, K_HEADS, BLOCK_KH, HALF)


def check_rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               cos_sin_cache: torch.Tensor) -> None:
    check_tensor("positions", positions, dims=1, dtypes=(torch.int64, torch.int32),
                 contiguous=True)
    check_tensor("q", q, dims=3, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, dims=3, dtypes=FLOAT_DTYPES)
    check_tensor("cos_sin_cache", cos_sin_cache, dims=2, dtypes=FLOAT_DTYPES)
    check_same_device(positions, q, k, cos_sin_cache)
    num_tokens, _, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or positions.shape[0] != num_tokens:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and positions "
                         f"{tuple(positions.shape)} disagree")
    if head_dim % 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(f"cos_sin_cache rows ({cos_sin_cache.shape[1]}) must equal the even "
                         f"head_dim ({head_dim})")


def tokens_per_program(q: torch.Tensor) -> int:
    """One token per program on the GPU; the interpreter wants few programs."""
    return 1 if q.device.type == "cuda" else rows_per_program(q.shape[0], q.shape[2], q.device)


def rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
         cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [num_tokens] int; q: [num_tokens, heads, head_dim]; k: [num_tokens, kv_heads,
    head_dim]; cos_sin_cache: [max_pos, head_dim]. Returns new rotated (q, k)."""
    check_rope(positions, q, k, cos_sin_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if num_tokens:
        half, tokens = head_dim // 2, tokens_per_program(q)
        _rope_kernel[(triton.cdiv(num_tokens, tokens),)](
            positions, q, k, cos_sin_cache, q_out, k_out, num_tokens,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            cos_sin_cache.stride(0),
            Q_HEADS=num_q_heads, K_HEADS=k.shape[1], BLOCK_QH=triton.next_power_of_2(num_q_heads),
            BLOCK_KH=triton.next_power_of_2(k.shape[1]), HALF=half,
            BLOCK_HALF=triton.next_power_of_2(half), TOKENS=tokens, num_warps=4,
        )
    return q_out, k_out
