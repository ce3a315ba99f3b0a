"""Engine configuration, validated once at construction."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property

DEFAULT_MODEL = os.environ.get("PAGODA_MODEL", "models/smollm2-135m-instruct")
CPU_KV_CACHE_GB = 1.0
QUANTIZATIONS = (None, "fp8")


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    dtype: str = "auto"  # auto: workers/dtype.py (bfloat16 where the device runs it natively)
    device: str = "auto"  # auto: cuda when available
    attention_backend: str = "auto"  # auto | torch | cpu | triton | flash
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: derived from kv_cache_memory_gb
    # None: on CUDA, what gpu_memory_utilization leaves after weights, activations and graphs;
    # elsewhere CPU_KV_CACHE_GB
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.9  # share of the GPU's total memory the engine may hold
    quantization: str | None = None  # None | fp8: E4M3 linear weights, quantized at load
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    max_waiting_requests: int = 1024
    cuda_graphs: bool = True
    num_threads: int | None = None  # CPU matmul threads; None: every core (Ray would give 1)
    tensor_parallel_size: int = 1  # devices that split every layer (one node)
    pipeline_parallel_size: int = 1  # stages of consecutive layers (may span nodes)
    seed: int = 0
    # testing aid, off by default: a prompt containing this text raises inside the engine step
    fault_marker: str | None = None
    hf_config: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not os.path.isdir(self.model):
            raise ValueError(f"model folder {self.model!r} does not exist; run `make model`")
        with open(os.path.join(self.model, "config.json")) as f:
            self.hf_config = json.load(f)
        if self.served_model_name is None:
            self.served_model_name = os.path.basename(os.path.normpath(self.model))
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.attention_backend not in ("auto", "torch", "cpu", "triton", "flash"):
            raise ValueError(f"unknown attention_backend {self.attention_backend!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"unknown dtype {self.dtype!r}")
        limit = self.hf_config.get("max_position_embeddings", 2048)
        window = self.hf_config.get("sliding_window")
        if window and self.hf_config.get("use_sliding_window", True):
            limit = min(limit, window)  # full attention equals sliding-window attention up to it
        if self.max_model_len is None:
            self.max_model_len = limit
        if not 0 < self.max_model_len <= limit:
            raise ValueError(f"max_model_len must be in [1, {limit}], got {self.max_model_len}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("tensor_parallel_size and pipeline_parallel_size must be positive")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        if self.quantization == "none":
            self.quantization = None
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}; supported: fp8")

    @property
    def world_size(self) -> int:
        """Devices, and ranks, of one replica."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @cached_property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)
