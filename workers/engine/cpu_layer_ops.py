"""Fused CPU layer ops: the C++ extension (cpu_layer_ops.cpp) and its wrappers.

Each op is one call and one pass over its rows, where the PyTorch references in
`kernels/reference.py` run several small ATen ops with dtype casts; at decode sizes their
per-op dispatch costs more than the arithmetic. The results equal the references' up to fp32
summation order. `make install` builds the extension ahead of time
(`python -m workers.engine.cpu_layer_ops`); where it cannot build, `load()` returns None and the
CPU backend keeps the references.
"""
from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

import torch

from workers.engine import cpu_extension

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_layer_ops.cpp")
NAME = "pagoda_cpu_layer_ops"
# products rounded one by one as torch rounds them, so results match the references exactly;
# no trapping math, or gcc leaves the loops that convert floats to ints scalar
FLAGS = ["-ffp-contract=off", "-fno-trapping-math"]


@functools.cache
def load() -> ModuleType | None:
    """The compiled extension, building it if needed; None where it cannot be built."""
    return cpu_extension.try_build(NAME, SOURCE, "CPU layer ops", FLAGS)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new residual): with a residual, x + residual is normed and returned as the
    new residual; without one, x itself is. x: [..., hidden]; weight: [hidden], x's dtype."""
    return _ops().rms_norm(x, weight, eps, residual)


def rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
         cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox rotary embedding, out of place. q/k: [tokens, heads, head_dim] with a contiguous
    last dim; positions: int64 [tokens]; cos_sin_cache: float32 [positions, head_dim]."""
    return _ops().rope(positions, q, k, cos_sin_cache)


def rope_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> torch.Tensor:
    """The rotated q; the rotated k and v go straight to the cache rows `slot_mapping` names
    (int64, a negative slot is skipped), caches [blocks, block_size, kv_heads, head_dim]."""
    return _ops().rope_write_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache,
                                slot_mapping)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k and v [tokens, kv_heads, head_dim] into the cache rows `slot_mapping` names."""
    _ops().write_kv(k, v, k_cache, v_cache, slot_mapping)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = cat(gate, up) [tokens, 2 * width] -> [tokens, width]."""
    return _ops().silu_mul(x)


def _ops() -> ModuleType:
    ext = load()
    if ext is None:
        raise RuntimeError("the CPU layer ops could not be built")
    return ext


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(f"CPU layer ops: {'built' if load() else 'unavailable'}")
