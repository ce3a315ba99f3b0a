"""The cos/sin cache rotary embedding reads, with the checkpoint's `rope_scaling` (llama3,
linear, or none). Row p is cat(cos(p * inv_freq), sin(p * inv_freq)), shape [head_dim]."""
from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, base: float, rope_scaling: dict | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, scaled as the checkpoint asks."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device)
                              .float() / head_dim)
    scaling = rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    try:
        factor = float(scaling["factor"])
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
    except KeyError as e:
        raise ValueError(f"llama3 rope_scaling is missing {e.args[0]!r}") from None
    if high <= low:
        raise ValueError(f"llama3 rope_scaling needs high_freq_factor > low_freq_factor, "
                         f"got {high} and {low}")
    # long wavelengths are slowed by `factor`, short ones kept, the band between blended
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, blended, scaled)


def build_rope_cache(head_dim: int, max_pos: int, base: float, rope_scaling: dict | None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """cos_sin_cache [max_pos, head_dim] fp32: cat(cos, sin) of position * inv_freq."""
    if head_dim % 2 or head_dim <= 0:
        raise ValueError(f"head_dim must be positive and even, got {head_dim}")
    if max_pos <= 0:
        raise ValueError(f"max_pos must be positive, got {max_pos}")
    inv_freq = rope_inv_freq(head_dim, base, rope_scaling, device)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32, device=device), inv_freq)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)
