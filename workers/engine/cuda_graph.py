"""Decode steps captured as CUDA graphs, one graph per batch-size bucket.

    runner = CudaGraphRunner(model, kv_caches, GraphShape(max_num_seqs=..., max_blocks_per_seq=...,
                             max_model_len=...), device, enabled=cfg.cuda_graphs)
    runner.capture()                   # once, after weights are loaded and the KV cache exists
    if runner.can_run(meta):           # decode-only batch with at most max_num_seqs sequences
        hidden = runner.run(input_ids, positions, meta)         # [num_seqs, hidden_size]
    else:
        hidden = model(input_ids, positions, kv_caches, meta)

`model(input_ids[T], positions[T], kv_caches, meta) -> hidden[T, hidden_size]` is called with
`meta` built from static buffers; logits are left to the caller, outside the graph. The result of
`run` is a view of a static buffer that the next `run` overwrites.

A later pipeline stage (`stage_input=(hidden_size, dtype)`) starts from the previous stage's
`(hidden, residual)`: `run(..., intermediate=...)` copies them into static buffers too, and the
model is called as `model(input_ids, positions, kv_caches, meta, (hidden, residual))`. A stage
before the last returns its `(hidden, residual)` pair, so `run` does too; the sends and
receives between stages stay outside the graphs.

A batch of n sequences replays the smallest bucket b >= n. Its padded rows get slot
`pad_slot` and seq_len 0, so they write no key and attention reads none for them (their ids and
positions keep earlier, valid values: `graph_inputs.StaticInputs`). Our Triton K/V writes
(TritonBackend and FlashBackend) skip slot -1; TorchBackend would index slot -1 from
the end, so with it reserve one dummy KV block and pass its first slot as `pad_slot`.
Inside the graph `meta.max_seq_len` is `max_model_len` (paged decode only sizes its split-K
grid from it) and the `*_cpu` lists describe the bucket, not the live batch: the model's
decode path must read only the device tensors. On CPU the runner is disabled.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from workers.engine.attention import AttentionMetadata
from workers.engine.graph_inputs import StaticInputs

log = logging.getLogger("pagoda.engine")

StageOutput = torch.Tensor | tuple[torch.Tensor, ...]  # hidden, or (hidden, residual) mid-pipeline


@dataclass(frozen=True)
class GraphShape:
    max_num_seqs: int
    max_blocks_per_seq: int
    max_model_len: int

    @property
    def buckets(self) -> list[int]:
        """1, 2, 4, 8, then every 8 up to max_num_seqs, which is always the last: every decode
        batch the scheduler can form replays a graph, padded by at most 7 rows."""
        sizes = [b for b in (1, 2, 4, 8) if b < self.max_num_seqs]
        sizes += list(range(16, self.max_num_seqs, 8))
        return sizes + [self.max_num_seqs]

    def bucket(self, num_seqs: int) -> int:
        """The smallest bucket that holds num_seqs sequences."""
        if not 0 < num_seqs <= self.max_num_seqs:
            raise ValueError(f"no graph bucket for {num_seqs} sequences "
                             f"(1..{self.max_num_seqs})")
        return next(b for b in self.buckets if b >= num_seqs)


class CudaGraphRunner:
    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 shape: GraphShape, device: torch.device | str, enabled: bool = True,
                 pad_slot: int = -1,
                 stage_input: tuple[int, torch.dtype] | None = None) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.shape = shape
        self.device = torch.device(device)
        self.enabled = enabled and self.device.type == "cuda"
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, StageOutput] = {}
        self.replays = 0  # decode steps run from a graph
        self.pool_bytes = 0  # device memory the captured graphs took
        # the static inputs exist on every device, so the padding is checked without a GPU
        n, width, dev = shape.max_num_seqs, shape.max_blocks_per_seq, self.device
        self.inputs = StaticInputs(n, dev, pad_slot, stage_input)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, width, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)

    def capture(self) -> None:
        """Captures every bucket, largest first so the smaller ones reuse its memory pool."""
        if not self.enabled or self.graphs:
            return
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = None
        for size in reversed(self.shape.buckets):
            meta = self._meta(size)
            args: tuple = (self.inputs.input_ids[:size], self.inputs.positions[:size],
                           self.kv_caches, meta)
            if self.inputs.intermediate is not None:
                args += (self.inputs.stage_args(size),)
            # warm-up compiles kernels; padded inputs write and read no KV slot
            self.model(*args)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.model(*args)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)
        self.pool_bytes = free_before - torch.cuda.mem_get_info(self.device)[0]
        log.info("CUDA graphs: %d decode batch sizes up to %d, %.2f GiB", len(self.graphs),
                 self.shape.max_num_seqs, self.pool_bytes / 2**30)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (bool(self.graphs) and meta.decode_only
                and 0 < meta.num_seqs <= self.shape.max_num_seqs
                and meta.block_tables.shape[1] <= self.shape.max_blocks_per_seq)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            intermediate: tuple[torch.Tensor, ...] | None = None) -> StageOutput:
        if not self.can_run(meta):
            raise ValueError("batch cannot replay a graph: needs decode-only, "
                             f"1..{self.shape.max_num_seqs} sequences, captured graphs")
        size = self.stage(input_ids, positions, meta, intermediate)
        self.graphs[size].replay()
        self.replays += 1
        out, n = self.outputs[size], meta.num_seqs
        return out[:n] if isinstance(out, torch.Tensor) else tuple(t[:n] for t in out)

    def stage(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
              intermediate: tuple[torch.Tensor, ...] | None = None) -> int:
        """Copy a decode batch into the static inputs, pad them to its bucket; the bucket."""
        n = meta.num_seqs
        size = self.shape.bucket(n)
        self.inputs.copy_in(size, input_ids, positions, meta.slot_mapping, intermediate)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[n:size].fill_(0)
        # entries past a row's last block are never read, so stale ones may stay
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        return size

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.inputs.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            query_start_loc_cpu=list(range(size + 1)),
            query_lens_cpu=[1] * size,
            seq_lens_cpu=[self.shape.max_model_len] * size,
            max_query_len=1,
            max_seq_len=self.shape.max_model_len,
        )
