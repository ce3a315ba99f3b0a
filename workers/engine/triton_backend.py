"""Attention backends built on our Triton kernels, with the interface of `attention.TorchBackend`.

TritonBackend runs every op with our Triton kernels. Its decode path (`meta.decode_only`) reads
only device tensors and Python ints that stay fixed for a captured batch size, so it is safe
inside a CUDA graph. With FP8 weights, `rms_norm_fp8` and `silu_mul_fp8` write the next
linear layer's E4M3 input and scales themselves (one kernel less per linear). FlashBackend
swaps attention for vllm-flash-attn's paged varlen kernel (`pip install .[flash]`) and keeps
the Triton kernels for the rest.
"""
from __future__ import annotations

import torch

from kernels.fp8_quant import MAX_WIDTH
from kernels.kv_write import kv_write
from kernels.paged_decode import paged_decode
from kernels.paged_prefill import paged_prefill
from kernels.rms_norm import rms_norm, rms_norm_fp8
from kernels.rope import rope
from kernels.rope_write_kv import rope_write_kv
from kernels.silu_mul import silu_mul, silu_mul_fp8
from workers.engine.attention import AttentionMetadata
from workers.engine.fp8 import QuantizedRows


class TritonBackend:
    """Our Triton kernels; the default on CUDA."""

    name = "triton"

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        kv_write(k, v, k_cache, v_cache, slot_mapping)

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim] -> same shape."""
        if meta.decode_only:
            # one query row per sequence, in order, so rows index sequences directly
            return paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                max_seq_len=meta.max_seq_len)
        return paged_prefill(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                             meta.block_tables, scale, max_query_len=meta.max_query_len)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, new_residual); with a residual, adds it to x first."""
        return rms_norm(x, weight, eps, residual)

    def rms_norm_fp8(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                     residual: torch.Tensor | None = None) -> tuple[QuantizedRows, torch.Tensor]:
        """rms_norm with the normed rows written as an Fp8Linear's quantized input."""
        values, scale, new_residual = rms_norm_fp8(x, weight, eps, residual)
        return QuantizedRows(values, scale, x.dtype), new_residual

    def rope(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
             cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Neox-style rotary embedding; q/k: [num_tokens, heads, head_dim]."""
        return rope(positions, q, k, cos_sin_cache)

    def rope_write_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, cos_sin_cache: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """RoPE on q and k, then k and v into the cache by slot, in one kernel; returns the
        rotated q."""
        return rope_write_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        return silu_mul(x)

    def silu_mul_fp8(self, x: torch.Tensor) -> QuantizedRows | torch.Tensor:
        """silu_mul written as an Fp8Linear's quantized input; rows too wide for one program
        stay plain, and the linear quantizes them."""
        if x.shape[-1] // 2 > MAX_WIDTH:
            return silu_mul(x)
        values, scale = silu_mul_fp8(x)
        return QuantizedRows(values, scale, x.dtype)


class FlashBackend(TritonBackend):
    """Attention from vllm-flash-attn over our paged cache; Triton kernels for everything else."""

    name = "flash"

    def __init__(self) -> None:
        try:
            from vllm_flash_attn import flash_attn_varlen_func
        except ImportError as e:
            raise ImportError("attention backend 'flash' needs vllm-flash-attn: "
                              "pip install '.[flash]'") from e
        self._varlen = flash_attn_varlen_func

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if k_cache.shape[1] % 16:
            raise ValueError(f"flash attention needs a block size divisible by 16, "
                             f"got {k_cache.shape[1]}")
        return self._varlen(
            q=q, k=k_cache, v=v_cache,
            cu_seqlens_q=meta.query_start_loc, max_seqlen_q=meta.max_query_len,
            seqused_k=meta.seq_lens, max_seqlen_k=meta.max_seq_len,
            softmax_scale=scale, causal=True, block_table=meta.block_tables,
        )
