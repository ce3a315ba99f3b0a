"""Megatron-style tensor-parallel pieces: which slice of each weight a rank holds, and the
vocab-parallel embedding.

Column-parallel linears (fused q/k/v by heads, fused gate/up) are plain `nn.Linear`s of the
rank's output rows: their outputs stay local, so the packed CPU linears apply unchanged.
Row-parallel linears (o_proj, down_proj) are plain `nn.Linear`s of the rank's input columns
whose caller sums the partial outputs with one all-reduce. When the tensor-parallel size
exceeds the number of KV heads, each KV head is replicated on tp / num_kv_heads ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.distributed import ParallelContext


@dataclass(frozen=True)
class ShardLayout:
    """The slices of a tensor rank; with tp_size 1 every slice is the whole tensor."""

    tp_size: int
    tp_rank: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    def check(self) -> None:
        tp, kv = self.tp_size, self.num_kv_heads
        if self.num_heads % tp:
            raise ValueError(f"{self.num_heads} attention heads do not split over "
                             f"tensor_parallel_size {tp}")
        if kv % tp and tp % kv:
            raise ValueError(f"{kv} KV heads neither split over nor replicate onto "
                             f"tensor_parallel_size {tp}")
        if self.intermediate_size % tp:
            raise ValueError(f"intermediate_size {self.intermediate_size} does not split over "
                             f"tensor_parallel_size {tp}")

    @property
    def heads(self) -> int:
        return self.num_heads // self.tp_size

    @property
    def kv_heads(self) -> int:
        return max(1, self.num_kv_heads // self.tp_size)

    @property
    def kv_head_start(self) -> int:
        return self.tp_rank * self.num_kv_heads // self.tp_size

    @property
    def intermediate(self) -> int:
        return self.intermediate_size // self.tp_size

    @property
    def vocab(self) -> int:
        """Rows per rank; the last rank's tail past vocab_size is zero padding."""
        return -(-self.vocab_size // self.tp_size)

    @property
    def vocab_start(self) -> int:
        return self.tp_rank * self.vocab

    def rows(self, kind: str, part: int | None) -> tuple[int, int, int]:
        """(dim, start, end) of the checkpoint tensor this rank reads for a parameter kind."""
        d, r = self.head_dim, self.tp_rank
        if kind == "qkv":
            if part == 0:
                return 0, r * self.heads * d, (r + 1) * self.heads * d
            return 0, self.kv_head_start * d, (self.kv_head_start + self.kv_heads) * d
        if kind == "gate_up":
            return 0, r * self.intermediate, (r + 1) * self.intermediate
        if kind == "o":
            return 1, r * self.heads * d, (r + 1) * self.heads * d
        if kind == "down":
            return 1, r * self.intermediate, (r + 1) * self.intermediate
        if kind == "vocab":
            return 0, self.vocab_start, min(self.vocab_start + self.vocab, self.vocab_size)
        raise ValueError(f"unknown shard kind {kind!r}")


def shard_kind(name: str) -> str | None:
    """How our parameter `name` is split over tensor ranks; None: replicated."""
    for suffix, kind in (("qkv_proj.weight", "qkv"), ("qkv_proj.bias", "qkv"),
                         ("gate_up_proj.weight", "gate_up"), ("o_proj.weight", "o"),
                         ("down_proj.weight", "down"), ("embed_tokens.weight", "vocab"),
                         ("lm_head.weight", "vocab")):
        if name.endswith(suffix):
            return kind
    return None


class VocabParallelEmbedding(nn.Module):
    """Each rank embeds the ids in its vocab range; one all-reduce assembles every row."""

    def __init__(self, layout: ShardLayout, hidden_size: int, ctx: ParallelContext) -> None:
        super().__init__()
        self.start, self.size, self.ctx = layout.vocab_start, layout.vocab, ctx
        self.weight = nn.Parameter(torch.zeros(layout.vocab, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.ctx.all_reduce(out.masked_fill_(outside[:, None], 0))
