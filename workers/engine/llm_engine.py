"""The engine: add_request, step (schedule -> run -> sample -> postprocess), abort.

A plain step runs one batch to its sampled tokens. With `async_scheduling` a step launches
the next batch before reading the previous one's tokens (`workers/engine/overlapped.py`);
split into pipeline stages, it launches a micro-batch and reads an earlier one
(`workers/engine/pipeline.py`).
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from transformers import AutoTokenizer

from workers.engine.admission import check_request, new_sequence
from workers.engine.block_manager import BlockManager
from workers.engine.config import EngineConfig
from workers.engine.errors import EngineDeadError, InvalidRequestError
from workers.engine.fault_injection import FaultInjector
from workers.engine.model_runner import ModelRunner
from workers.engine.outputs import RequestOutput
from workers.engine.overlapped import OverlappedSteps
from workers.engine.pipeline import Pipeline
from workers.engine.sampler import Sampler, SamplerOutput
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import ScheduledBatch, Scheduler
from workers.engine.sequence import Sequence, SequenceStatus
from workers.engine.step_outputs import StepOutputs
from workers.engine.worker import ProcessWorkers, Workers

if TYPE_CHECKING:
    from xgrammar import CompiledGrammar

    from workers.engine.grammar import GrammarCompiler

log = logging.getLogger("pagoda.engine")


class LLMEngine:
    def __init__(self, config: EngineConfig,
                 start_workers: Callable[[EngineConfig], Workers] = ProcessWorkers) -> None:
        self.config = config
        self.max_model_len = config.context_len  # reads and checks the model folder first
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        # split over devices: this process is rank 0, the other ranks run in workers
        self.workers = start_workers(config) if config.world_size > 1 else None
        try:
            self.runner = ModelRunner(
                config, 0, self.workers.init_method if self.workers is not None else None)
        except BaseException:
            if self.workers is not None:
                self.workers.stop()
            raise
        self.vocab_size = self.runner.model_config.vocab_size
        self.eos_token_ids = self._eos_token_ids()
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        micro_batches = config.micro_batches
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, micro_batches > 1)
        self.sampler = Sampler(self.vocab_size, self.eos_token_ids, config.max_num_seqs,
                               self.runner.device)
        self._grammar: GrammarCompiler | None = None  # built on the first constrained request
        self._grammar_lock = threading.Lock()
        self.seqs: dict[str, Sequence] = {}
        self.faults = FaultInjector(config.fault_marker, self.tokenizer)
        self.failed: list[tuple[str, Exception]] = []  # (request id, error) of the last step
        self.last_step_time = 0.0  # seconds in the last model forward
        self.last_schedule_time = 0.0  # seconds outside it: scheduling, batching, sampling, outputs
        # a weak reference back: a dropped engine frees its device memory at once, not at the
        # next garbage collection (the next engine sizes its KV cache from what is free)
        me = weakref.proxy(self)
        self.overlapped = OverlappedSteps(me) \
            if config.overlap_steps(self.runner.device.type) else None
        self.pipeline = Pipeline(me, micro_batches) if micro_batches > 1 else None

    @property
    def async_scheduling(self) -> bool:
        return self.overlapped is not None

    def _eos_token_ids(self) -> frozenset[int]:
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        eos = self.config.hf_config.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return frozenset(ids)

    def compile_grammar(self, params: SamplingParams) -> CompiledGrammar | None:
        """The request's compiled constraint, if it has one; safe to call from any thread."""
        if params.json_schema is None and params.grammar is None:
            return None
        with self._grammar_lock:
            if self._grammar is None:
                from workers.engine.grammar import GrammarCompiler  # xgrammar is only needed here

                self._grammar = GrammarCompiler(self.tokenizer, self.vocab_size,
                                                sorted(self.eos_token_ids))
        return self._grammar.compile(params.json_schema, params.grammar)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise a typed error if the request cannot be served; changes no state."""
        check_request(prompt_token_ids, params, self.max_model_len, self.vocab_size)

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, compiled: CompiledGrammar | None = None) -> None:
        """`compiled`: the request's grammar from `compile_grammar`, when compiled already."""
        if request_id in self.seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already running.")
        self.validate(prompt_token_ids, params)
        seq = new_sequence(request_id, prompt_token_ids, params,
                           compiled or self.compile_grammar(params), self.tokenizer,
                           self.vocab_size, self.runner.device, self.eos_token_ids,
                           self.max_model_len)
        self.seqs[request_id] = seq
        self.faults.watch(request_id, seq.prompt_token_ids)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        self._finish(seq, "abort")
        outputs = StepOutputs()
        outputs.add(seq, [], [], "abort")
        return outputs[0]

    def _finish(self, seq: Sequence, reason: str) -> None:
        """The request is over: its blocks go back and the engine forgets it."""
        self.scheduler.finish(seq, reason)
        self.runner.release(seq.request_id)
        self.sampler.release(seq.request_id)
        self.seqs.pop(seq.request_id, None)
        self.faults.forget(seq.request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self.overlapped) or bool(self.pipeline)

    def workers_alive(self) -> bool:
        return self.workers is None or self.workers.alive()

    def close(self) -> None:
        """Stop the worker ranks, if any; the engine is unusable afterwards."""
        try:
            self.runner.close()
        finally:
            if self.workers is not None:
                self.workers.stop()

    def step(self) -> StepOutputs:
        """One engine step; its outputs are built when first read. Requests whose step raised
        are in `failed` afterwards, not in the outputs."""
        start = time.perf_counter()
        self.failed = []
        self.last_step_time = 0.0
        outputs = StepOutputs()
        if self.pipeline is not None:
            self.pipeline.step(outputs)
        elif self.overlapped is not None:
            self.overlapped.step(outputs)
        else:
            self._step(outputs)
        self.last_schedule_time = (time.perf_counter() - start) - self.last_step_time
        return outputs

    def _step(self, outputs: StepOutputs) -> None:
        batch = self.scheduler.schedule()
        if batch:
            self.run(batch, outputs)

    def run(self, batch: ScheduledBatch, outputs: StepOutputs) -> None:
        """Run a batch; if it raises, run each half alone, so a request that breaks every step
        it is in fails by itself. Nothing is committed before the forward and sampling succeed,
        and a rerun rewrites the same KV slots."""
        try:
            if self.faults.marked:
                self.faults.check([s.request_id for s in batch.seqs])
            forward_start = time.perf_counter()
            logits = self.runner.execute(batch)
            if self.runner.device.type == "cuda":
                torch.cuda.synchronize()  # free: sampling syncs right after; keeps timing honest
            self.last_step_time += (time.perf_counter() - forward_start
                                    - self.runner.last_prepare_time)
            sampling = logits.sampling_seqs(batch)
            sampled = (self.sampler(logits.sample, sampling) if logits.sample is not None
                       else SamplerOutput([], []))
        except EngineDeadError:  # the replica itself is broken: no request can run alone
            raise
        except Exception as e:
            if len(batch) > 1:
                first, second = batch.split()
                self.run(first, outputs)
                self.run(second, outputs)
                return
            log.exception("request %s failed inside an engine step", batch.seqs[0].request_id)
            self.fail(batch.seqs[0], e)
            return
        for i, prompt_logits in logits.prompt.items():
            self.record_prompt_logprobs(batch.seqs[i], prompt_logits)
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
        self.block_manager.cache_full_blocks(batch.seqs)
        append = self.append_token
        for seq, token, logprob in zip(sampling, sampled.token_ids, sampled.logprobs,
                                       strict=True):
            append(seq, token, logprob, outputs)

    def fail(self, seq: Sequence, error: Exception) -> None:
        """The request raised inside a step (logged by the caller): it ends alone."""
        self._finish(seq, "error")
        self.failed.append((seq.request_id, error))

    def append_token(self, seq: Sequence, token: int, logprob, outputs: StepOutputs) -> None:
        token_ids = seq.token_ids
        token_ids.append(token)
        num_tokens = len(token_ids)
        grammar = seq.grammar
        if grammar is not None:
            grammar.accept(token)
        finish = None
        text_end = num_tokens
        if token in seq.stop_ids and seq.num_output_tokens >= seq.params.min_tokens:
            finish = "stop"  # the stop token's own text is not part of the output
            text_end -= 1
        elif seq.eager_text and seq.detokenizer.add_token(
                token, check_stop=seq.num_output_tokens >= seq.params.min_tokens) is not None:
            finish = "stop"  # a stop string
        elif grammar is not None and grammar.terminated:
            finish = "stop"
        elif num_tokens >= seq.token_limit:
            finish = "length"
        if finish is not None:
            self._finish(seq, finish)
        outputs.add(seq, [token], None if logprob is None else [logprob], finish, text_end)

    def record_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor,
                                begin: int | None = None) -> None:
        """`begin`: the computed tokens when the step started; by default seq's now, not yet
        advanced for this step."""
        if begin is None:
            begin = seq.num_computed_tokens
        targets = seq.prompt_token_ids[begin + 1:begin + 1 + logits.shape[0]]
        top_n = seq.params.prompt_logprobs
        assert top_n is not None, "only requests that ask for prompt logprobs get prompt rows"
        if begin == 0 or seq.prompt_logprobs is None:  # (re)starting, also after a preemption
            seq.prompt_logprobs = [None]  # the first token has no context to be predicted from
        seq.prompt_logprobs += self.sampler.token_logprobs(logits, targets, top_n)

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_blocks": bm.num_blocks,
            "num_free_blocks": bm.num_free_blocks,
            "kv_usage": bm.usage,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "cached_block_hashes": bm.cached_hashes(),
        }

    def abort_all(self, reason: str = "abort") -> list[Sequence]:
        """Drop every request (after an engine fault); returns the dropped sequences."""
        dropped = list(self.seqs.values())
        if self.overlapped is not None:
            self.overlapped.clear()
        if self.pipeline is not None:
            self.pipeline.clear()
        for seq in dropped:
            if seq.status != SequenceStatus.FINISHED:
                self._finish(seq, reason)
        self.seqs.clear()
        return dropped

