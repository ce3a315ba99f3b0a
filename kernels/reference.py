"""The PyTorch reference of every kernel: what the kernel tests compare with, and the ops of
the torch attention backend. Torch only, so the CPU engine never imports Triton."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KV_FP8 = torch.float8_e4m3fn  # an FP8 KV cache: E4M3 values with a scale of 1
KV_FP8_MAX = 448.0


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a KV cache of `dtype` holds it: into E4M3, clamped to +-448 (round to nearest even)."""
    if dtype == KV_FP8:
        return x.float().clamp(-KV_FP8_MAX, KV_FP8_MAX).to(KV_FP8)
    return x.to(dtype)


def kv_write_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    num_blocks, block_size = k_cache.shape[:2]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:])[slots] = \
        to_cache_dtype(k[keep], k_cache.dtype)
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:])[slots] = \
        to_cache_dtype(v[keep], v_cache.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return out.to(x.dtype) * weight, x


def rope_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
             cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin_cache[positions].float().unsqueeze(1).chunk(2, dim=-1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def paged_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Gathers each sequence's keys and values and runs fp32 softmax attention."""
    out = torch.zeros_like(q)
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    for i, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        blocks = block_tables[i, : math.ceil(n / block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:n].float().repeat_interleave(group, dim=1)
        v = v_cache[blocks].flatten(0, 1)[:n].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale
        out[i] = torch.einsum("hn,nhd->hd", F.softmax(scores, dim=-1), v).to(q.dtype)
    return out


def paged_prefill_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Per sequence: gather keys/values, fp32 softmax with the causal mask offset by the prefix."""
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    starts = query_start_loc.tolist()
    for i, n in enumerate(seq_lens.tolist()):
        lo, hi = starts[i], starts[i + 1]
        blocks = block_tables[i, : math.ceil(n / block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:n].float().repeat_interleave(group, dim=1)
        v = v_cache[blocks].flatten(0, 1)[:n].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,nhd->hqn", q[lo:hi].float(), k) * scale
        pos = torch.arange(n - (hi - lo), n, device=q.device)
        visible = torch.arange(n, device=q.device)[None, :] <= pos[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[lo:hi] = torch.einsum("hqn,nhd->qhd", F.softmax(scores, dim=-1), v).to(q.dtype)
    return out
