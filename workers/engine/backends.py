"""Picks the attention backend a model runs with; the Triton and C++ ones load only when chosen."""
from __future__ import annotations

import torch

from workers.engine.attention import TorchBackend


def get_backend(name: str, device: torch.device, fp8_kv: bool = False):
    """auto: flash when installed on CUDA, else Triton on CUDA; on CPU the C++ decode kernel
    where it builds, else the torch reference. An E4M3 KV cache (`fp8_kv`) is read by the
    Triton and torch backends only."""
    if name == "auto" and fp8_kv:
        name = "triton" if device.type == "cuda" else "torch"
    if name == "auto":
        if device.type == "cpu":
            from workers.engine.cpu_attention import CpuBackend, load

            return CpuBackend() if load() is not None else TorchBackend()
        if device.type != "cuda":
            return TorchBackend()
        try:
            import vllm_flash_attn  # noqa: F401
            name = "flash"
        except ImportError:
            name = "triton"
    if name == "torch":
        return TorchBackend()
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"attention backend 'cpu' runs on the CPU, not {device.type}")
        from workers.engine.cpu_attention import CpuBackend

        return CpuBackend()
    if name == "triton":
        from workers.engine.triton_backend import TritonBackend

        return TritonBackend()
    if name == "flash":
        from workers.engine.triton_backend import FlashBackend

        return FlashBackend()
    raise ValueError(f"unknown attention backend {name!r}")
