"""Attention backends: the interface the model calls, and the PyTorch reference backend.

The KV cache of one layer is two tensors `[num_blocks, block_size, num_kv_heads, head_dim]`.
A step writes its new K/V into the cache by slot mapping first, then attention reads every
key and value (cached prefix and new tokens alike) through the block table.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.reference import KV_FP8, rms_norm_ref, rope_ref, silu_mul_ref, to_cache_dtype


@dataclass
class AttentionMetadata:
    """One step's flattened batch; sequence i owns query rows query_start_loc[i]:[i+1]."""

    slot_mapping: torch.Tensor  # [num_tokens] int64, block * block_size + offset
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    query_start_loc_cpu: list[int]
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1


DECODE_GROUP = 16


class TorchBackend:
    """Reference backend in plain PyTorch; the production path on CPU."""

    name = "torch"

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        for new, cache in ((k, k_cache), (v, v_cache)):
            rows = to_cache_dtype(new.reshape(new.shape[0], -1), cache.dtype)
            _bytes(cache).view(num_slots, -1).index_copy_(0, slot_mapping, _bytes(rows))

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim] -> same shape."""
        out = torch.empty_like(q)
        decodes = [i for i, n in enumerate(meta.query_lens_cpu) if n == 1]
        if decodes:
            lens = [meta.seq_lens_cpu[i] for i in decodes]
            rows: slice | torch.Tensor
            seqs: slice | torch.Tensor
            if decodes[-1] == len(decodes) - 1:  # decodes lead the batch: plain slices
                rows = seqs = slice(0, len(decodes))
            else:
                rows = meta.query_start_loc[torch.tensor(decodes)]
                seqs = torch.tensor(decodes)
            out[rows] = self._decode(q[rows], k_cache, v_cache, meta.block_tables[seqs],
                                     meta.seq_lens[seqs], lens, scale)
        prefills = [i for i, n in enumerate(meta.query_lens_cpu) if n > 1]
        if prefills:
            self._prefills(out, q, k_cache, v_cache, meta, prefills, scale)
        return out

    def _prefills(self, out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, meta: AttentionMetadata, seqs: list[int],
                  scale: float) -> None:
        """Attention of sequences `seqs` (several query rows each) into their rows of out."""
        for i in seqs:
            start, n = meta.query_start_loc_cpu[i], meta.query_lens_cpu[i]
            out[start:start + n] = self._prefill(q[start:start + n], k_cache, v_cache,
                                                 meta.block_tables[i], meta.seq_lens_cpu[i], scale)

    @staticmethod
    def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int,
                dtype: torch.dtype) -> torch.Tensor:
        """A sequence's (or a batch's) first `length` keys or values, in `dtype`."""
        num_blocks, block_size, heads, dim = cache.shape
        table = block_table[..., : -(-length // block_size)]
        # index_select on a 2-D view is a plain multi-threaded row copy, much faster than indexing
        rows = cache.view(num_blocks, -1).index_select(0, table.reshape(-1).long()).to(dtype)
        return rows.view(*table.shape[:-1], -1, heads, dim)[..., :length, :, :]

    def _decode(self, q, k_cache, v_cache, block_tables, seq_lens, lens, scale):
        # Groups of similar length (the engine sorts decodes longest first): gathering every
        # row to the batch's longest context would copy mostly padding.
        if lens != sorted(lens, reverse=True):
            return self._decode_group(q, k_cache, v_cache, block_tables, seq_lens, max(lens),
                                      scale)
        out = torch.empty_like(q)
        for start in range(0, len(lens), DECODE_GROUP):
            g = slice(start, start + DECODE_GROUP)
            out[g] = self._decode_group(q[g], k_cache, v_cache, block_tables[g], seq_lens[g],
                                        lens[g][0], scale)
        return out

    def _decode_group(self, q, k_cache, v_cache, block_tables, seq_lens, max_len, scale):
        # One query row per head: SDPA's kernels are slow at that shape on CPU, two bmm per KV
        # head over the gathered context are 1.5x faster.
        k = self._gather(k_cache, block_tables, max_len, q.dtype)  # [B, L, Hkv, D]
        v = self._gather(v_cache, block_tables, max_len, q.dtype)
        b, _, kv_heads, dim = k.shape
        q = q.view(b, kv_heads, -1, dim)  # [B, Hkv, group, D]
        padding = torch.arange(max_len, device=q.device)[None, None, :] >= seq_lens[:, None, None]
        out = torch.empty_like(q)
        for h in range(kv_heads):
            scores = torch.bmm(q[:, h], k[:, :, h].transpose(1, 2)).float().mul_(scale)
            probs = scores.masked_fill_(padding, float("-inf")).softmax(-1).to(v.dtype)
            out[:, h] = torch.bmm(probs, v[:, :, h])
        return out.view(b, -1, dim)

    def _prefill(self, q, k_cache, v_cache, block_table, seq_len, scale):
        n, heads, _ = q.shape
        k = self._gather(k_cache, block_table, seq_len, q.dtype).transpose(0, 1)  # [Hkv, L, D]
        v = self._gather(v_cache, block_table, seq_len, q.dtype).transpose(0, 1)
        # 4-D inputs with every query head's K/V materialized take SDPA's flash path on CPU;
        # 3-D or enable_gqa inputs fall back to the 3x slower math path.
        k = k.repeat_interleave(heads // k.shape[0], dim=0)[None]
        v = v.repeat_interleave(heads // v.shape[0], dim=0)[None]
        q = q.transpose(0, 1)[None]
        if n == seq_len:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            pos = torch.arange(seq_len - n, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= pos[:, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return o[0].transpose(0, 1)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, new_residual); with a residual, adds it to x first."""
        return rms_norm_ref(x, weight, eps, residual)

    def rope(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
             cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Neox-style rotary embedding; q/k: [num_tokens, heads, head_dim]."""
        return rope_ref(positions, q, k, cos_sin_cache)

    def rope_write_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, cos_sin_cache: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """RoPE on q and k, then k and v into the cache by slot; returns the rotated q."""
        q, k = self.rope(positions, q, k, cos_sin_cache)
        self.write_kv(k, v, k_cache, v_cache, slot_mapping)
        return q

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        return silu_mul_ref(x)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """An E4M3 tensor as bytes, which CPU index ops take (they lack float8); others as they are."""
    return t.view(torch.uint8) if t.dtype == KV_FP8 else t
