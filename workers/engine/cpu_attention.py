"""CPU attention: the paged decode C++ extension (cpu_paged_decode.cpp), its launcher, and the
attention backend that uses it.

The extension is compiled on first use with the machine's C++ compiler for the machine's own
instruction set (`-march=native`) and cached under $PAGODA_KERNEL_CACHE (default
~/.cache/pagoda/kernels), keyed by the CPU's feature flags so a cache shared between machines
never hands one a binary it cannot run, and by the source.
`make install` builds it ahead of time (`python -m workers.engine.cpu_attention`). Where it
cannot build (no compiler, no ninja), `load()` returns None and callers keep their PyTorch
path. The reference is `kernels.reference.paged_decode_ref`.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from types import ModuleType

import torch

from workers.engine.attention import TorchBackend

log = logging.getLogger("pagoda.engine")
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_paged_decode.cpp")
NAME = "pagoda_cpu_paged_decode"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fopenmp-simd"]


def build_directory(source: str = SOURCE, name: str = NAME) -> str:
    """Where extension `name` from `source` is built, keyed by CPU flags, torch, python and the
    source itself, so an edited kernel builds afresh, never over a loaded copy."""
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(os.devnull) as f:
        flags = next((line for line in f if line.startswith("flags")), "")
    with open(source, "rb") as f:
        text = f.read()
    key = hashlib.sha256(f"{flags}{torch.__version__}{sys.version}".encode() + text)
    root = os.environ.get("PAGODA_KERNEL_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "pagoda", "kernels"))
    return os.path.join(root, f"{name}-{key.hexdigest()[:12]}")


def build(source: str, name: str = NAME) -> ModuleType:
    """Compiles (or reuses the cached build of) one C++ source as extension `name`."""
    from torch.utils import cpp_extension

    try:  # ninja from PyPI lives next to the venv's python, which may not be on PATH
        import ninja
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    except ImportError:
        pass
    directory = build_directory(source, name)
    os.makedirs(directory, exist_ok=True)
    return cpp_extension.load(name, [source], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                              build_directory=directory, verbose=False)


@functools.cache
def load() -> ModuleType | None:
    """The compiled extension, building it if needed; None where it cannot be built."""
    try:
        return build(SOURCE)
    except Exception as e:  # noqa: BLE001 - any build failure means: use the PyTorch path
        log.warning("CPU attention kernel unavailable, using the PyTorch path: %s",
                    str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return None


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

    def _decode(self, q, k_cache, v_cache, block_tables, seq_lens, lens, scale):
        return paged_decode_cpu(q, k_cache, v_cache, block_tables, seq_lens, scale)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(f"CPU attention kernel: {'built in ' + build_directory() if load() else 'unavailable'}")
