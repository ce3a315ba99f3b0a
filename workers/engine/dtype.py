"""The engine's compute dtype: what `dtype: auto` picks for the device it runs on, and why."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The first CPU's feature flags; empty where the file does not exist (macOS, Windows)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cpu_native_bf16() -> str | None:
    """The instruction set that gives this CPU bf16 matmuls at hardware speed, or None.

    Without one, oneDNN emulates bf16 and runs slower than float32.
    """
    found = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags()]
    if not found:  # no /proc/cpuinfo: ask torch's own CPU probe
        probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
        found = [flag for flag, fn in probes.items() if getattr(torch.cpu, fn, lambda: False)()]
    if found and torch.backends.mkldnn.is_available():
        return "/".join(found)
    return None


def choose_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """(dtype, reason) for a configured dtype name on `device`."""
    if name != "auto":
        return DTYPES[name], "configured"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: the GPU supports bfloat16"
        return torch.float16, "auto: the GPU lacks bfloat16"
    if device.type == "cpu":
        native = cpu_native_bf16()
        if native:
            return torch.bfloat16, f"auto: the CPU has native bf16 ({native})"
        return torch.float32, "auto: the CPU has no native bf16 (no AVX-512 BF16 or AMX)"
    return torch.float32, f"auto: float32 on {device.type}"
