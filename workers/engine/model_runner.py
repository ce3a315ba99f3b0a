"""Owns the model and its KV cache; runs one flattened mixed batch per step."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from workers.engine.attention import AttentionMetadata
from workers.engine.backends import get_backend
from workers.engine.config import EngineConfig
from workers.engine.cuda_graph import CudaGraphRunner, GraphShape
from workers.engine.loader import load_weights
from workers.engine.model import CausalLM, ModelConfig
from workers.engine.packed_linear import PackedLinear, pack_linears, packing_supported
from workers.engine.scheduler import ScheduledBatch


@dataclass
class StepLogits:
    sample: torch.Tensor | None  # [sampling seqs, vocab], in batch order
    prompt: dict[int, torch.Tensor]  # batch index -> logits of its prompt rows this step


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = DTYPES.get(config.dtype) or (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model_config = ModelConfig.from_hf(config.hf_config)
        if self.device.type == "cpu":
            # Ray sets OMP_NUM_THREADS=1 in actors with fractional CPUs; the engine wants the cores
            torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
        self.backend = get_backend(config.attention_backend, self.device)
        torch.manual_seed(config.seed)
        with torch.device(self.device):
            model = CausalLM(self.model_config, self.backend)
        load_weights(model, config.model)
        self.model = model.to(self.dtype).eval()
        self.model.rope_cache = self.model.rope_cache.float()
        if packing_supported(self.device, self.dtype):
            pack_linears(self.model)
            if self.model.lm_head is None:  # tied embeddings: pack a copy for the logits
                self.model.lm_head = PackedLinear(self.model.embed_tokens.weight)
        self.num_blocks = config.num_kv_blocks or self._blocks_for_budget()
        self.kv_caches = self._allocate_kv()
        self.last_prepare_time = 0.0  # seconds spent flattening the last batch
        self.graphs = CudaGraphRunner(
            self.model, self.kv_caches,
            GraphShape(config.max_num_seqs, config.max_blocks_per_seq, config.max_model_len),
            self.device, enabled=config.cuda_graphs and self.backend.name != "torch")
        self.graphs.capture()

    @property
    def kv_bytes_per_token(self) -> int:
        c = self.model_config
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * self.dtype.itemsize

    def _blocks_for_budget(self) -> int:
        per_block = self.kv_bytes_per_token * self.config.block_size
        return max(1, int(self.config.kv_cache_memory_gb * 2**30 // per_block))

    def _allocate_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.model_config
        shape = (2, self.num_blocks, self.config.block_size, c.num_kv_heads, c.head_dim)
        return [tuple(torch.zeros(shape, dtype=self.dtype, device=self.device).unbind(0))
                for _ in range(c.num_layers)]

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor,
                                                      AttentionMetadata, list[int], list]:
        """Flattens the batch: input ids, positions, metadata, rows to sample and prompt-logprob
        rows."""
        bs = self.config.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts, seq_lens, sample_rows = [0], [], []
        prompt_rows: list[tuple[int, int, int]] = []  # (batch index, first row, count)
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            begin = seq.num_computed_tokens
            input_ids += seq.token_ids[begin:begin + n]
            pos = range(begin, begin + n)
            positions += pos
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in pos]
            starts.append(starts[-1] + n)
            seq_lens.append(begin + n)
            if begin + n == seq.num_tokens:
                sample_rows.append(starts[-1] - 1)
            if seq.params.prompt_logprobs is not None and begin < seq.num_prompt_tokens - 1:
                # row j predicts the token at position begin + j + 1
                count = min(n, seq.num_prompt_tokens - 1 - begin)
                prompt_rows.append((len(starts) - 2, starts[-2], count))
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in batch.seqs]

        def tensor(data, dtype):
            return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            query_start_loc=tensor(starts, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            block_tables=tensor(tables, torch.int32),
            query_start_loc_cpu=starts,
            query_lens_cpu=list(batch.num_new_tokens),
            seq_lens_cpu=seq_lens,
            max_query_len=max(batch.num_new_tokens),
            max_seq_len=max(seq_lens),
        )
        return (tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta, sample_rows,
                prompt_rows)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepLogits:
        """Run the batch; logits of the sequences that sample, and of prompt-logprob rows."""
        start = time.perf_counter()
        input_ids, positions, meta, rows, prompt_rows = self.prepare(batch)
        self.last_prepare_time = time.perf_counter() - start
        if self.graphs.can_run(meta):
            hidden = self.graphs.run(input_ids, positions, meta)
            return self._logits(hidden, rows, prompt_rows)
        # Denormal floats make x86 matmuls up to 2x slower. The flag is per thread and would
        # leak into the caller's other float code, so it is on only while the forward runs.
        flush = self.device.type == "cpu" and torch.set_flush_denormal(True)
        try:
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
            return self._logits(hidden, rows, prompt_rows)
        finally:
            if flush:
                torch.set_flush_denormal(False)

    def _logits(self, hidden: torch.Tensor, rows: list[int], prompt_rows: list) -> StepLogits:
        prompt = {i: self.model.compute_logits(hidden[first:first + count])
                  for i, first, count in prompt_rows}
        return StepLogits(self.model.compute_logits(hidden[rows]) if rows else None, prompt)
