"""Picks the attention backend a model runs with; the Triton ones load only when chosen."""
from __future__ import annotations

import torch

from workers.engine.attention import TorchBackend


def get_backend(name: str, device: torch.device):
    """auto: flash when installed on CUDA, else Triton on CUDA, else the torch reference."""
    if name == "auto":
        if device.type != "cuda":
            return TorchBackend()
        try:
            import vllm_flash_attn  # noqa: F401
            name = "flash"
        except ImportError:
            name = "triton"
    if name == "torch":
        return TorchBackend()
    if name == "triton":
        from workers.engine.triton_backend import TritonBackend

        return TritonBackend()
    if name == "flash":
        from workers.engine.triton_backend import FlashBackend

        return FlashBackend()
    raise ValueError(f"unknown attention backend {name!r}")
