"""Owns the model and its KV cache; runs one flattened mixed batch per step.

Split over devices, every rank has a ModelRunner with its shard of the weights and KV cache.
The driver (rank 0) flattens the batch into a StepPlan and hands it to the other ranks, which
run the same forward in `serve_forever`; the full-vocabulary logits come back to the driver.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from kernels.reference import KV_FP8
from workers.engine.attention import AttentionMetadata
from workers.engine.backends import get_backend
from workers.engine.config import EngineConfig
from workers.engine.cuda_graph import CudaGraphRunner, GraphShape
from workers.engine.distributed import (
    ParallelContext,
    Send,
    destroy_parallel,
    init_parallel,
    isend,
    stage_layers,
    wait_all,
)
from workers.engine.dtype import choose_dtype
from workers.engine.errors import WorkerGroupError
from workers.engine.fp8 import quantize_linears
from workers.engine.fp8_matmul_choice import ShapeChoice, choose_matmuls
from workers.engine.input_batch import InputBatch
from workers.engine.input_staging import InputStaging
from workers.engine.kv_memory import blocks_from_free_memory, configured_blocks, log_choice
from workers.engine.loader import load_weights
from workers.engine.model import CausalLM, ModelConfig
from workers.engine.packed_linear import PackedLinear, pack_linears, packing_supported
from workers.engine.piecewise_graph import PiecewiseGraphRunner
from workers.engine.scheduler import ScheduledBatch
from workers.engine.step_logits import StepLogits, receive_logits, step_logits
from workers.engine.step_plan import StepPlan, receive_plan, send_plan, start_sending_plan

if TYPE_CHECKING:
    from torch.distributed import Work


@dataclass
class LaunchedStep:
    """A step in a pipeline: the driver ran its first stage, the last stage sends the logits."""

    plan: StepPlan
    plan_sends: list[Work]  # the plan's hand-off to the other ranks, maybe still going


log = logging.getLogger("pagoda.engine")


def resolve_device(name: str, rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())  # ranks in one process
    return device


def prepare_step_thread(device: torch.device) -> None:
    """Call on a thread that will run steps, before its first op. On CPUs, denormal floats
    flush to zero there: arithmetic on them runs in microcode, and activations of unusual tokens
    (softmax and SiLU tails) made whole steps 3.5-5x slower. The thread's OpenMP workers,
    started by its first parallel op, inherit the setting; other threads keep IEEE floats."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0,
                 init_method: str | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device, rank)
        self.dtype, self.dtype_reason = choose_dtype(config.dtype, self.device)
        log.info("dtype %s (%s)", str(self.dtype).removeprefix("torch."), self.dtype_reason)
        self.model_config = ModelConfig.from_hf(config.hf_config)
        if self.device.type == "cpu":
            # Ray sets OMP_NUM_THREADS=1 in actors with fractional CPUs; the engine wants the cores
            torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
        elif self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.model_config.layout(ParallelContext(config.tensor_parallel_size,
                                                 config.pipeline_parallel_size)).check()
        self.ctx = init_parallel(config.tensor_parallel_size, config.pipeline_parallel_size,
                                 rank, init_method or "", self.device)
        self.backend = get_backend(config.attention_backend, self.device,
                                   fp8_kv=config.kv_cache_dtype == "fp8")
        self.kv_dtype = KV_FP8 if config.kv_cache_dtype == "fp8" else self.dtype
        torch.manual_seed(config.seed)
        with torch.device(self.device):
            model = CausalLM(self.model_config, self.backend, self.ctx)
        load_weights(model, config.model)
        self.model = model.to(self.dtype).eval()
        self.model.rope_cache = self.model.rope_cache.float()
        self.fp8_matmuls: list[ShapeChoice] = []  # on FP8 tensor cores: the matmul per shape
        if config.quantization == "fp8":
            quantized = quantize_linears(self.model)
            fused = self.model.fuse_fp8_inputs()
            log.info("fp8: %d linear layers quantized to E4M3, %d of them take their input "
                     "quantized by the kernel before them", quantized, fused)
            self.fp8_matmuls = choose_matmuls(self.model, self.dtype)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.rank_weight_bytes = self._gather_weight_bytes()
        if packing_supported(self.device, self.dtype):
            pack_linears(self.model)
            if self.model.lm_head is None and self.ctx.is_last_stage:
                # tied embeddings: pack a copy for the logits, on the stage that computes them
                self.model.lm_head = PackedLinear(self.model.head_weight)
        self.input_batch = InputBatch(config.max_num_seqs, config.max_blocks_per_seq,
                                      config.block_size)
        self.staging = InputStaging(self.device)
        self.last_prepare_time = 0.0  # seconds spent flattening the last batch
        self.last_handoff_time = 0.0  # seconds spent handing the last plan to the other ranks
        self.broken = False  # a step across ranks failed: the group cannot be used again
        self.sends: list[Send] = []  # this rank's activations or logits still being sent
        graphs = config.cuda_graphs and self.backend.name != "torch"
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.graphs: CudaGraphRunner | None = None  # captured once the KV cache exists
        self.piecewise: PiecewiseGraphRunner | None = None
        self.num_blocks = self._size_kv_cache(graphs)
        self.kv_caches = self._allocate_kv()
        stage_input = None if self.ctx.is_first_stage else \
            (self.model_config.hidden_size, self.dtype)
        self.graphs = CudaGraphRunner(
            self.model, self.kv_caches,
            GraphShape(config.max_num_seqs, config.max_blocks_per_seq, config.context_len),
            self.device, enabled=graphs, stage_input=stage_input)
        self.graphs.capture()
        self.piecewise = PiecewiseGraphRunner(
            self.model, self.kv_caches, config.max_num_batched_tokens, self.device, self.dtype,
            enabled=graphs, stage_input=stage_input)
        self.piecewise.capture()

    def prepare_thread(self) -> None:
        prepare_step_thread(self.device)

    @property
    def kv_bytes_per_token(self) -> int:
        """On the rank with the most KV: every rank sizes its cache for the same block count."""
        c, ctx = self.model_config, self.ctx
        layers = max(len(stage_layers(c.num_layers, ctx.pp_size, s)) for s in range(ctx.pp_size))
        kv_heads = c.layout(ctx).kv_heads
        return 2 * layers * kv_heads * c.head_dim * self.kv_dtype.itemsize

    def _size_kv_cache(self, graphs: bool) -> int:
        block_bytes = self.kv_bytes_per_token * self.config.block_size
        blocks = configured_blocks(self.config, block_bytes, self.device.type == "cuda")
        how = "configured"
        if blocks is None:
            blocks, how = blocks_from_free_memory(self, block_bytes, graphs)
        log_choice(blocks, self.config.block_size, block_bytes, how)
        return blocks

    def _allocate_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.model_config
        shape = (2, self.num_blocks, self.config.block_size, c.layout(self.ctx).kv_heads,
                 c.head_dim)
        kv = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
              for _ in self.model.stage]
        return [(t[0], t[1]) for t in kv]

    def _gather_weight_bytes(self) -> list[int]:
        if self.ctx.world_size == 1:
            return [self.weight_bytes]
        out: list[int] | None = [0] * self.ctx.world_size if self.ctx.rank == 0 else None
        dist.gather_object(self.weight_bytes, out, dst=0, group=self.ctx.cpu_group)
        return out or []

    def prepare(self, batch: ScheduledBatch) -> StepPlan:
        """Flatten the batch into the plan every rank runs."""
        return self.input_batch.plan(batch)

    def release(self, request_id: str) -> None:
        """The request is over: forget its step inputs."""
        self.input_batch.release(request_id)

    def inputs(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        def int64(data) -> torch.Tensor:
            if isinstance(data, torch.Tensor):
                return data.long()
            return torch.from_numpy(np.asarray(data, dtype=np.int64))  # 3x faster from a list

        ids, positions, slots, starts, lens, tables = self.staging.to_device([int64(x) for x in (
            plan.input_ids, plan.positions, plan.slot_mapping, plan.query_start_loc,
            plan.seq_lens, plan.block_tables)])
        query_lens = plan.query_lens
        meta = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=starts.int(),
            seq_lens=lens.int(),
            block_tables=tables.int(),
            query_start_loc_cpu=plan.query_start_loc,
            query_lens_cpu=query_lens,
            seq_lens_cpu=plan.seq_lens,
            max_query_len=max(query_lens),
            max_seq_len=max(plan.seq_lens),
        )
        return ids, positions, meta

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, sampled: torch.Tensor | None = None) -> StepLogits:
        """Run the batch; logits of the sequences that sample, and of prompt-logprob rows.
        `sampled` holds the previous step's tokens, still on the device, for the decodes
        whose input they are (each at its `pending_row`)."""
        start = time.perf_counter()
        plan = self.prepare(batch)
        self.last_prepare_time = time.perf_counter() - start
        if self.ctx.world_size == 1:
            return self._run_driver(plan, sampled)
        with self._across_ranks():
            send_plan(plan, self.ctx)
            if plan.pending:  # the tokens in flight, device to device, in plan order
                assert sampled is not None, "a plan with pending inputs comes with their tokens"
                sources = torch.tensor([source for _, source in plan.pending])
                dist.broadcast(sampled[sources.to(self.device, non_blocking=True)], 0,
                               group=self.ctx.device_group)
            self.last_handoff_time = time.perf_counter() - start - self.last_prepare_time
            return self._run_driver(plan, sampled)

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> LaunchedStep:
        """Pipeline: run the batch's first stage and pass it on, without waiting for the
        logits (`finish`), so the first stage can take the next micro-batch meanwhile."""
        start = time.perf_counter()
        plan = self.prepare(batch)
        self.last_prepare_time = time.perf_counter() - start
        with self._across_ranks():
            sends = start_sending_plan(plan, self.ctx)
            self.last_handoff_time = time.perf_counter() - start - self.last_prepare_time
            self.run(plan, receive=False)
        return LaunchedStep(plan, sends)

    def finish(self, step: LaunchedStep) -> StepLogits:
        """Wait for a launched step's logits from the last stage."""
        with self._across_ranks():
            logits = self._receive_logits(step.plan)
            for work in step.plan_sends:
                work.wait()
            return logits

    @contextmanager
    def _across_ranks(self) -> Iterator[None]:
        """A rank that fails mid-step leaves the group out of step: the replica is done."""
        try:
            yield
        except Exception as e:
            self.broken = True
            raise WorkerGroupError(f"a step across {self.ctx.world_size} ranks failed: "
                                   f"{e}") from e

    def _run_driver(self, plan: StepPlan, sampled: torch.Tensor | None = None) -> StepLogits:
        logits = self.run(plan, sampled)
        assert logits is not None, "rank 0 ends every step holding the logits"
        return logits

    @torch.inference_mode()
    def run(self, plan: StepPlan, sampled: torch.Tensor | None = None,
            receive: bool = True) -> StepLogits | None:
        """This rank's part of one step; the logits on the driver, None on other ranks (and
        on the driver of a pipeline without `receive`: `finish` receives them later)."""
        input_ids, positions, meta = self.inputs(plan)
        if plan.pending:  # inputs sampled by the previous step: copied device to device
            assert sampled is not None, "a plan with pending inputs comes with their tokens"
            if plan.pending_in_place:  # steady decodes: 2 against 26 us at 256
                input_ids[:len(plan.pending)] = sampled[:len(plan.pending)]
            else:  # flat, then split: 2x np.array over the tuples, 7x torch.tensor
                flat = np.fromiter(itertools.chain.from_iterable(plan.pending), np.int64,
                                   2 * len(plan.pending))
                pairs = torch.from_numpy(flat).to(self.device, non_blocking=True)
                input_ids[pairs[0::2]] = sampled[pairs[1::2]]
        intermediate = None
        if not self.ctx.is_first_stage:
            intermediate = self.ctx.recv_from_previous_stage(
                *(torch.empty(plan.num_tokens, self.model_config.hidden_size,
                              dtype=self.dtype, device=self.device) for _ in range(2)))
        out = self._forward(input_ids, positions, meta, intermediate)
        if self.ctx.is_last_stage:
            return self._logits(out, plan)
        wait_all(self.sends)
        self.sends = self.ctx.send_to_next_stage(*out)
        return self._receive_logits(plan) if self.ctx.rank == 0 and receive else None

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata, intermediate: tuple[torch.Tensor, ...] | None):
        """This stage's layers: from CUDA graphs when they fit the batch (whole for decodes,
        piecewise with a prefill), else eagerly."""
        for graphs in (self.graphs, self.piecewise):
            if graphs is not None and graphs.can_run(meta):
                out = graphs.run(input_ids, positions, meta, intermediate)
                # the next replay overwrites these buffers while their send may be in flight
                return out if self.ctx.is_last_stage else tuple(t.clone() for t in out)
        # Denormal floats make x86 matmuls up to 2x slower. The flag is per thread and would
        # leak into the caller's other float code, so it is on only while the forward runs.
        flush = self.device.type == "cpu" and torch.set_flush_denormal(True)
        try:
            return self.model(input_ids, positions, self.kv_caches, meta, intermediate)
        finally:
            if flush:
                torch.set_flush_denormal(False)

    def _logits(self, hidden: torch.Tensor, plan: StepPlan) -> StepLogits | None:
        step = step_logits(self.model, hidden, plan, self.ctx)
        if step is None or self.ctx.rank == 0:
            return step
        packed = step.packed()  # last stage of a pipeline: the driver samples
        if packed is not None:  # sent while this stage goes on with the next micro-batch
            wait_all(self.sends)
            self.sends = [isend(packed, 0, self.ctx.device_group)]
        return None

    def _receive_logits(self, plan: StepPlan) -> StepLogits:
        return receive_logits(plan, self.ctx, self.model_config.vocab_size, self.dtype,
                              self.device)

    def serve_forever(self) -> None:
        """A worker rank's loop: run every plan the driver sends until it stops the group."""
        while (plan := receive_plan(self.ctx)) is not None:
            in_flight = None
            if plan.pending:  # inputs sampled by the driver's step in flight
                in_flight = torch.empty(len(plan.pending), dtype=torch.int64, device=self.device)
                dist.broadcast(in_flight, 0, group=self.ctx.device_group)
            self.run(plan, in_flight)
        wait_all(self.sends)
        destroy_parallel(self.ctx)

    def close(self) -> None:
        """Driver: stop the worker ranks' loops and leave the group."""
        if self.ctx.world_size > 1 and not self.broken and dist.is_initialized():
            try:
                wait_all(self.sends)
                send_plan(None, self.ctx)
            finally:
                destroy_parallel(self.ctx)
