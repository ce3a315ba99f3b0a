"""CPU attention: the paged decode and prefill C++ extensions (cpu_paged_decode.cpp,
cpu_paged_prefill.cpp), their launchers, and the attention backend that uses them, with the fused
layer ops of `cpu_layer_ops`.

Each extension is built for this machine's CPU and cached by `cpu_extension`; `make install`
builds them ahead of time (`python -m workers.engine.cpu_attention`). Where one cannot build (no
compiler, no ninja), its loader returns None and callers keep their PyTorch path. The references
are `kernels.reference.paged_decode_ref` and `kernels.reference.paged_prefill_ref`.
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
HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "cpu_paged_decode.cpp")
NAME = "pagoda_cpu_paged_decode"
PREFILL_SOURCE = os.path.join(HERE, "cpu_paged_prefill.cpp")
PREFILL_NAME = "pagoda_cpu_paged_prefill"


@functools.cache
def load() -> ModuleType | None:
    """The compiled decode extension, building it if needed; None where it cannot be built."""
    return cpu_extension.try_build(NAME, SOURCE, "CPU attention kernel")


@functools.cache
def load_prefill() -> ModuleType | None:
    """The compiled prefill extension, building it if needed; None where it cannot be built."""
    return cpu_extension.try_build(PREFILL_NAME, PREFILL_SOURCE, "CPU prefill attention kernel")


def paged_decode_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q: [seqs, heads, head_dim]; caches: [blocks, block_size, kv_heads, head_dim];
    block_tables: [seqs, width] int32; seq_lens: [seqs] int32 (0: a zero row)."""
    ext = load()
    if ext is None:
        raise RuntimeError("the CPU attention kernel could not be built")
    return ext.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale)


def paged_prefill_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                      seq_lens: torch.Tensor, seqs: torch.Tensor, out: torch.Tensor,
                      scale: float) -> None:
    """Causal attention of sequences `seqs` written into their rows of `out` (shaped as q).
    Sequence i owns q rows query_start_loc[i]:[i+1], the last of its seq_lens[i] positions;
    every index tensor is int32."""
    ext = load_prefill()
    if ext is None:
        raise RuntimeError("the CPU prefill attention kernel could not be built")
    ext.paged_prefill(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, seqs, out,
                      scale)


class CpuBackend(TorchBackend):
    """The torch backend with decode attention from the C++ kernel, which reads K/V straight
    from the cache blocks instead of gathering them first."""

    name = "cpu"

    def __init__(self) -> None:
        if load() is None:
            raise RuntimeError("attention backend 'cpu' needs the C++ kernel, which could not "
                               "be built (see the warning above)")
        # the fused layer ops and the prefill kernel where they build, else the torch paths
        self.fused = cpu_layer_ops.load() is not None
        self.prefill_kernel = load_prefill() is not None

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

    def _prefills(self, out, q, k_cache, v_cache, meta, seqs, scale):
        if not self.prefill_kernel:
            return super()._prefills(out, q, k_cache, v_cache, meta, seqs, scale)
        paged_prefill_cpu(q.contiguous(), k_cache, v_cache, meta.block_tables,
                          meta.query_start_loc, meta.seq_lens,
                          torch.tensor(seqs, dtype=torch.int32), out, scale)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    for name, source, loader in [(NAME, SOURCE, load),
                                 (PREFILL_NAME, PREFILL_SOURCE, load_prefill)]:
        built = loader() is not None
        print(f"{name}: " + (f"built in {cpu_extension.build_directory(name, source)}"
                             if built else "unavailable"))
