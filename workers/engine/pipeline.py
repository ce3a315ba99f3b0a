"""Micro-batches in a pipeline: every stage busy with a different batch of requests.

Split into pipeline stages, one step at a time leaves all but one stage idle. The engine then
keeps `micro_batches` steps (by default one per stage) in the pipeline at once, as vLLM's
virtual engines do: each engine step launches a micro-batch on the first stage and, once the
pipeline is full, reads the oldest one's logits from the last stage, samples them and builds
their outputs. Micro-batches hold disjoint decodes (the scheduler skips a sequence whose token
is still in the pipeline) and each takes about an equal share of the requests, so the stages
get balanced work.
"""
from __future__ import annotations

import logging
import time
from collections import deque

from workers.engine.in_flight import Engine, MicroBatch, advance
from workers.engine.scheduler import ScheduledBatch
from workers.engine.step_outputs import StepOutputs

log = logging.getLogger("pagoda.engine")


class Pipeline:
    def __init__(self, engine: Engine, micro_batches: int) -> None:
        self.engine = engine
        self.micro_batches = micro_batches
        self.in_flight: deque[MicroBatch] = deque()  # oldest first

    def __bool__(self) -> bool:
        return bool(self.in_flight)

    def step(self, outputs: StepOutputs) -> None:
        """Launch the next micro-batch; read the oldest one first when the pipeline is full,
        or instead when no request is free to start."""
        if len(self.in_flight) >= self.micro_batches:
            self._finish(self.in_flight.popleft(), outputs)
        scheduler = self.engine.scheduler
        # an equal share of what can run at once, however long the queue behind it
        runnable = min(len(scheduler.running) + len(scheduler.waiting), scheduler.max_num_seqs)
        share = -(-runnable // self.micro_batches)
        batch = self._without_faults(scheduler.schedule(share))
        if batch:
            self._launch(batch)
        elif self.in_flight:
            self._finish(self.in_flight.popleft(), outputs)

    def clear(self) -> None:
        self.in_flight.clear()

    def _without_faults(self, batch: ScheduledBatch) -> ScheduledBatch:
        """A launched micro-batch cannot be rerun in halves: requests that would raise in it
        fail before it starts."""
        engine = self.engine
        if not engine.faults.marked:
            return batch
        kept = ScheduledBatch()
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            try:
                engine.faults.check([seq.request_id])
            except Exception as e:
                log.exception("request %s failed inside an engine step", seq.request_id)
                engine.fail(seq, e)
                continue
            kept.seqs.append(seq)
            kept.num_new_tokens.append(n)
        return kept

    def _launch(self, batch: ScheduledBatch) -> None:
        engine = self.engine
        forward_start = time.perf_counter()
        launched = engine.runner.launch(batch)
        engine.last_step_time += (time.perf_counter() - forward_start
                                  - engine.runner.last_prepare_time)
        begins = [seq.num_computed_tokens for seq in batch.seqs]
        sampling = batch.sampling_seqs()
        advance(batch, sampling)
        self.in_flight.append(MicroBatch(batch, sampling, begins, launched))
        engine.block_manager.cache_full_blocks(batch.seqs)  # every input token is known now

    def _finish(self, step: MicroBatch, outputs: StepOutputs) -> None:
        """Sample a micro-batch's logits; requests that ended meanwhile drop theirs."""
        engine = self.engine
        forward_start = time.perf_counter()
        logits = engine.runner.finish(step.launched)
        engine.last_step_time += time.perf_counter() - forward_start
        for i, prompt_logits in logits.prompt.items():
            seq = step.batch.seqs[i]
            if not seq.finished:
                engine.record_prompt_logprobs(seq, prompt_logits, step.begins[i])
        for seq in step.sampling:
            seq.num_pending -= 1
        live = [i for i, seq in enumerate(step.sampling) if not seq.finished]
        if logits.sample is None or not live:
            return
        seqs = [step.sampling[i] for i in live]
        rows = logits.sample if len(live) == len(step.sampling) else logits.sample[live]
        try:
            sampled = engine.sampler(rows, seqs)
        except Exception:  # find the requests that break sampling: each row alone
            log.exception("sampling a micro-batch failed: sampling its rows one by one")
            for i, seq in enumerate(seqs):
                try:
                    alone = engine.sampler(rows[i:i + 1], [seq])
                except Exception as e:
                    log.exception("request %s failed inside an engine step", seq.request_id)
                    engine.fail(seq, e)
                    continue
                engine.append_token(seq, alone.token_ids[0], alone.logprobs[0], outputs)
            return
        append = engine.append_token
        for seq, token, logprob in zip(seqs, sampled.token_ids, sampled.logprobs, strict=True):
            append(seq, token, logprob, outputs)
