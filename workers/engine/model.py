"""Llama-family decoder (Llama, Qwen2, Mistral) over a paged KV cache.

q/k/v and gate/up projections are fused into one matmul each; every layer-level op goes
through the attention backend so the Triton kernels can replace the torch reference. Split over
devices, each tensor rank holds its heads and MLP columns (`workers/engine/parallel_layers.py`) and
each pipeline stage its layers; with one device the model is the plain single-process one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.rope_cache import build_rope_cache
from workers.engine.attention import AttentionMetadata
from workers.engine.distributed import ParallelContext, stage_layers
from workers.engine.fp8 import Fp8Linear
from workers.engine.packed_linear import PackedLinear
from workers.engine.parallel_layers import ShardLayout, VocabParallelEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]
SUPPORTED = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    sliding_window: int | None

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {SUPPORTED}")
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or cfg.get("attention_bias", False),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True)
            else None,
        )

    def layout(self, ctx: ParallelContext) -> ShardLayout:
        return ShardLayout(ctx.tp_size, ctx.tp_rank, self.num_heads, self.num_kv_heads,
                           self.head_dim, self.intermediate_size, self.vocab_size)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        shard = cfg.layout(ctx)
        self.ctx = ctx
        self.num_heads, self.num_kv_heads, self.head_dim = shard.heads, shard.kv_heads, cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)  # row-parallel

    def project_qkv(self, x, positions, kv_cache: KVCache, meta: AttentionMetadata, rope_cache,
                    backend) -> torch.Tensor:
        """The rotated queries [tokens, heads, head_dim]; the rotated keys and the values go
        into the cache (of `meta`, only the slot mapping is read)."""
        qkv = self.qkv_proj(x)
        n = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        return backend.rope_write_kv(positions, q, k, v, rope_cache, kv_cache[0], kv_cache[1],
                                     meta.slot_mapping)

    def attend(self, q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
               backend) -> torch.Tensor:
        """Attention over the cache: [tokens, q_size]."""
        o = backend.attention(q, kv_cache[0], kv_cache[1], meta, self.scale)
        return o.reshape(q.shape[0], self.q_size)

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        return self.ctx.all_reduce(self.o_proj(o))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        size = cfg.layout(ctx).intermediate
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * size, bias=False)
        self.down_proj = nn.Linear(size, cfg.hidden_size, bias=False)  # row-parallel
        self.fp8_input = False  # silu_mul writes down_proj's E4M3 input (CausalLM.fuse_fp8_inputs)

    def forward(self, x, backend) -> torch.Tensor:
        h = self.gate_up_proj(x)
        h = backend.silu_mul_fp8(h) if self.fp8_input else backend.silu_mul(h)
        return self.ctx.all_reduce(self.down_proj(h))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.self_attn = Attention(cfg, ctx)
        self.mlp = MLP(cfg, ctx)
        self.input_layernorm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.post_attention_layernorm = nn.Parameter(torch.ones(cfg.hidden_size))
        # the norms write the E4M3 inputs of qkv_proj and gate_up_proj (CausalLM.fuse_fp8_inputs)
        self.fp8_inputs = False

    def forward(self, x, residual, positions, kv_cache, meta, rope_cache, backend):
        q, residual = self.before_attention(x, residual, positions, kv_cache, meta, rope_cache,
                                            backend)
        o = self.self_attn.attend(q, kv_cache, meta, backend)
        return self.after_attention(o, residual, backend)

    def before_attention(self, x, residual, positions, kv_cache, meta, rope_cache, backend):
        """Input norm, then q/k/v: (rotated queries, residual); K/V go into the cache."""
        h, residual = self._norm(backend)(x, self.input_layernorm, self.eps, residual)
        return self.self_attn.project_qkv(h, positions, kv_cache, meta, rope_cache,
                                          backend), residual

    def after_attention(self, o, residual, backend):
        """Output projection, post-attention norm and MLP: (hidden, residual)."""
        h, residual = self._norm(backend)(self.self_attn.project_out(o),
                                          self.post_attention_layernorm, self.eps, residual)
        return self.mlp(h, backend), residual

    def _norm(self, backend):
        return backend.rms_norm_fp8 if self.fp8_inputs else backend.rms_norm


class CausalLM(nn.Module):
    """One pipeline stage of the model: the embedding on the first, the final norm and the
    LM head on the last, and its layers, named by their global index as in the checkpoint."""

    def __init__(self, cfg: ModelConfig, backend, ctx: ParallelContext | None = None) -> None:
        super().__init__()
        ctx = ctx or ParallelContext()
        shard = cfg.layout(ctx)
        shard.check()
        self.cfg, self.ctx, self.backend = cfg, ctx, backend
        self.stage = stage_layers(cfg.num_layers, ctx.pp_size, ctx.pp_rank)
        self.embed_tokens = None
        if ctx.is_first_stage:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) \
                if ctx.tp_size == 1 else VocabParallelEmbedding(shard, cfg.hidden_size, ctx)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, ctx) for i in self.stage})
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size)) if ctx.is_last_stage else None
        # None: tied and on the embedding's stage, the logits reuse its weight
        self.lm_head: nn.Linear | PackedLinear | None = None
        if ctx.is_last_stage and (not cfg.tie_word_embeddings or self.embed_tokens is None):
            self.lm_head = nn.Linear(cfg.hidden_size, shard.vocab, bias=False)
        self.register_buffer("rope_cache", build_rope_cache(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling),
            persistent=False)

    def fuse_fp8_inputs(self, enabled: bool = True) -> int:
        """Where the backend can, its RMSNorm and SiLU-mul kernels write the quantized inputs of
        the Fp8Linear layers after them, which then skip their own quantization kernel.
        Returns how many linear layers get their input that way."""
        norm = enabled and hasattr(self.backend, "rms_norm_fp8")
        silu = enabled and hasattr(self.backend, "silu_mul_fp8")
        layers = [m for m in self.modules() if isinstance(m, DecoderLayer)]
        for layer in layers:
            layer.fp8_inputs = norm and isinstance(layer.self_attn.qkv_proj, Fp8Linear) and \
                isinstance(layer.mlp.gate_up_proj, Fp8Linear)
            layer.mlp.fp8_input = silu and isinstance(layer.mlp.down_proj, Fp8Linear)
        return sum(2 * layer.fp8_inputs + layer.mlp.fp8_input for layer in layers)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Hidden states after the final norm on the last stage; on earlier stages the
        (hidden, residual) pair the next stage continues from."""
        x, residual = self.start(input_ids, intermediate)
        for layer, kv_cache in zip(self.layers.values(), kv_caches, strict=False):
            x, residual = layer(x, residual, positions, kv_cache, meta, self.rope_cache,
                                self.backend)
        return self.finish(x, residual)

    def start(self, input_ids: torch.Tensor,
              intermediate: tuple[torch.Tensor, ...] | None = None) -> tuple:
        """(hidden, residual) before the first layer: embedded tokens, or what the previous
        pipeline stage passed on."""
        if intermediate is None:
            assert self.embed_tokens is not None, "only the first stage starts from token ids"
            return self.embed_tokens(input_ids), None
        return intermediate

    def finish(self, x: torch.Tensor, residual: torch.Tensor):
        """After the last layer: the final norm's output, or (hidden, residual) to pass on."""
        if self.norm is None:
            return x, residual
        return self.backend.rms_norm(x, self.norm, self.cfg.rms_norm_eps, residual)[0]

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's weight: its own, or the embedding's when they are tied."""
        if self.lm_head is not None:
            return self.lm_head.weight
        assert self.embed_tokens is not None, "a tied head shares the embedding's stage"
        return self.embed_tokens.weight

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Full-vocabulary logits on tensor rank 0 of the last stage; None on other ranks."""
        local = self.lm_head(hidden) if self.lm_head is not None else hidden @ self.head_weight.t()
        if self.ctx.tp_size == 1:
            return local
        logits = self.ctx.gather_vocab(local)
        return None if logits is None else logits[:, :self.cfg.vocab_size]
