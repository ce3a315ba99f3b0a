"""CPU attention: the paged decode C++ extension (cpu_paged_decode.cpp), its launcher, and the
attention backend that uses it, with the fused layer ops of `cpu_layer_ops`.

The extension is built for this machine's CPU and cached by `cpu_extension`; `make install`
builds it ahead of time (`python -m workers.engine.cpu_attention`). Where it cannot build (no
compiler, no ninja), `load()` returns None and callers keep their PyTorch path. The reference
is `kernels.reference.paged_decode_ref`.
"""
from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

import torch

from workers.engine import cpu_extension, cpu_layer_ops
from workers.engine.attention import TorchBackend

log = logging.getLogger("pagoda.engine")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_paged_decode.cpp")
NAME = "pagoda_cpu_paged_decode"


@functools.cache
def load() -> ModuleType | None:
    """The compiled extension, building it if needed; None where it cannot be built."""
    return cpu_extension.try_build(NAME, SOURCE, "CPU attention kernel")


def paged_decode_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q: [seqs, heads, head_dim]; caches: [blocks, block_size, kv_heads, head_dim];
    block_tables: [seqs, width] int32; seq_lens: [seqs] int32 (0: a zero row)."""
    ext = load()
    if ext is None:
        raise RuntimeError("the CPU attention kernel could not be built")
    return ext.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale)


class CpuBackend(TorchBackend):
    """The torch backend with decode attention from the C++ kernel, which reads K/V straight
    from the cache blocks instead of gathering them first."""

    name = "cpu"

    def __init__(self) -> None:
        if load() is None:
            raise RuntimeError("attention backend 'cpu' needs the C++ kernel, which could not "
                               "be built (see the warning above)")
        # the fused layer ops where they build, else the torch references
        self.fused = cpu_layer_ops.load() is not None

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.fused or weight.dtype != x.dtype:
            return super().rms_norm(x, weight, eps, residual)
        return cpu_layer_ops.rms_norm(x, weight, eps, residual)

    def rope(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
             cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.fused:
            return super().rope(positions, q, k, cos_sin_cache)
        return cpu_layer_ops.rope(positions, q, k, cos_sin_cache)

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if not self.fused:
            return super().write_kv(k, v, k_cache, v_cache, slot_mapping)
        cpu_layer_ops.write_kv(k, v, k_cache, v_cache, slot_mapping)

    def rope_write_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, cos_sin_cache: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super().rope_write_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache,
                                         slot_mapping)
        return cpu_layer_ops.rope_write_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache,
                                           slot_mapping)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super().silu_mul(x)
        return cpu_layer_ops.silu_mul(x)

    def _decode(self, q, k_cache, v_cache, block_tables, seq_lens, lens, scale):
        return paged_decode_cpu(q, k_cache, v_cache, block_tables, seq_lens, scale)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    built = load() is not None
    print("CPU attention kernel: " +
          (f"built in {cpu_extension.build_directory(NAME, SOURCE)}" if built else "unavailable"))
