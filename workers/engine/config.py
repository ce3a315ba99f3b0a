"""Engine configuration: the `engine:` section of the Serve args and what `LLM(...)` takes.

Validation never touches the model folder (a config is checked where `serve run` runs, which
may lack it); the folder's `config.json` is read on first use of `hf_config` or `context_len`.
"""
from __future__ import annotations

import json
import os
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_MODEL = os.environ.get("PAGODA_MODEL", "models/smollm2-135m-instruct")
CPU_KV_CACHE_GB = 1.0  # the KV cache off CUDA when neither its size nor its blocks are set


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = DEFAULT_MODEL  # an HF-format folder on every node that runs the engine
    served_model_name: str | None = None  # None: the model folder's name
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: workers/dtype.py
    device: str = "auto"  # auto: cuda when available
    attention_backend: Literal["auto", "torch", "cpu", "triton", "flash"] = "auto"
    block_size: int = Field(16, ge=1)
    num_kv_blocks: int | None = Field(None, ge=1)  # None: derived from kv_cache_memory_gb
    # None: on CUDA, what gpu_memory_utilization leaves after weights, activations and graphs;
    # elsewhere CPU_KV_CACHE_GB (workers/engine/kv_memory.py)
    kv_cache_memory_gb: float | None = Field(None, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # share of the GPU the engine holds
    quantization: Literal["fp8"] | None = None  # fp8: E4M3 linear weights, quantized at load
    # fp8: keys and values held in E4M3 with a scale of 1, half the bytes of bf16 (Triton or
    # torch attention); auto: the model's dtype
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_model_len: int | None = Field(None, ge=1)  # None: the model's own limit (context_len)
    enable_prefix_caching: bool = True
    max_waiting_requests: int = Field(1024, ge=0)
    cuda_graphs: bool = True
    # overlap steps (the host prepares step N+1 while the device runs step N); None: on a
    # single GPU, where the host otherwise idles the device; off on CPU, where nothing overlaps
    async_scheduling: bool | None = None
    num_threads: int | None = Field(None, ge=1)  # CPU matmul threads; None: every core
    tensor_parallel_size: int = Field(1, ge=1)  # devices that split every layer (one node)
    pipeline_parallel_size: int = Field(1, ge=1)  # stages of consecutive layers (may span nodes)
    # micro-batches in a pipeline at once (disjoint requests, one per stage keeps every stage
    # busy); None: pipeline_parallel_size; 1: each step runs through every stage alone
    pipeline_batches: int | None = Field(None, ge=1)
    seed: int = 0
    # testing aid, off by default: a prompt containing this text raises inside the engine step
    fault_marker: str | None = None

    @field_validator("quantization", mode="before")
    @classmethod
    def _none_means_unquantized(cls, value: Any) -> Any:
        return None if value == "none" else value

    @model_validator(mode="after")
    def check(self) -> EngineConfig:
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")
        if self.async_scheduling and self.pipeline_parallel_size > 1:
            raise ValueError("async_scheduling needs pipeline_parallel_size 1")
        if self.kv_cache_dtype == "fp8" and self.attention_backend in ("cpu", "flash"):
            raise ValueError(f"kv_cache_dtype fp8 needs the triton or torch attention backend, "
                             f"not {self.attention_backend}")
        return self

    @cached_property
    def hf_config(self) -> dict[str, Any]:
        if not os.path.isdir(self.model):
            raise ValueError(f"model folder {self.model!r} does not exist; run `make model`")
        with open(os.path.join(self.model, "config.json")) as f:
            config: dict[str, Any] = json.load(f)
        return config

    @cached_property
    def context_len(self) -> int:
        """Prompt plus output tokens of one request: max_model_len, within the model's limit."""
        limit: int = self.hf_config.get("max_position_embeddings", 2048)
        window = self.hf_config.get("sliding_window")
        if window and self.hf_config.get("use_sliding_window", True):
            limit = min(limit, window)  # full attention equals sliding-window attention up to it
        if self.max_model_len is None:
            return limit
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len must be in [1, {limit}], got {self.max_model_len}")
        return self.max_model_len

    @property
    def model_name(self) -> str:
        """The name clients ask for."""
        return self.served_model_name or os.path.basename(os.path.normpath(self.model))

    @property
    def world_size(self) -> int:
        """Devices, and ranks, of one replica."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def overlap_steps(self, device_type: str) -> bool:
        if self.async_scheduling is None:
            return device_type == "cuda" and self.pipeline_parallel_size == 1
        return self.async_scheduling

    @property
    def micro_batches(self) -> int:
        """Steps in the pipeline at once; 1 without a pipeline."""
        if self.pipeline_parallel_size == 1:
            return 1
        return self.pipeline_batches or self.pipeline_parallel_size

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.context_len // self.block_size)

    @property
    def max_choices(self) -> int:
        """Requests one engine holds at once, running or waiting."""
        return self.max_num_seqs + self.max_waiting_requests
