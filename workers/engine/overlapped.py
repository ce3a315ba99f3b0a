"""Overlapped steps: the host schedules and launches step N+1 while the device runs step N.

Step N's sampled tokens stay on the device, where they are N+1's decode inputs; the host reads
them after launching N+1, then detokenizes, checks stops and builds their outputs, one step
behind, as vLLM's async scheduling does. A request that stopped at N has its N+1 token
dropped, so outputs are those of plain steps. A request whose sampling reads its previous
tokens on the host (penalties, min_tokens, a grammar) has them read before the next launch.
"""
from __future__ import annotations

import logging
import time

from workers.engine.errors import EngineDeadError
from workers.engine.in_flight import Engine, InFlight, advance, needs_history
from workers.engine.scheduler import ScheduledBatch
from workers.engine.sequence import SequenceStatus
from workers.engine.step_outputs import StepOutputs

log = logging.getLogger("pagoda.engine")
FINISHED = SequenceStatus.FINISHED


class OverlappedSteps:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.in_flight: InFlight | None = None

    def __bool__(self) -> bool:
        return self.in_flight is not None

    def clear(self) -> None:
        self.in_flight = None

    def step(self, outputs: StepOutputs) -> None:
        prev, self.in_flight = self.in_flight, None
        if prev is not None and any([needs_history(s) for s in prev.sampling
                                     if not (s.history_free and s.grammar is None)
                                     and not s.finished]):
            self._complete(prev, outputs)
            prev = None
        batch = self.engine.scheduler.schedule()
        if batch:
            self._launch_or_run(batch, prev, outputs)
        elif prev is not None:
            self._complete(prev, outputs)

    def _launch_or_run(self, batch: ScheduledBatch, prev: InFlight | None,
                       outputs: StepOutputs) -> None:
        """Launch the batch, then complete the step before it; if the launch raises, complete
        that step and run the batch the plain way, which isolates a failing request."""
        engine = self.engine
        try:
            if engine.faults.marked:
                engine.faults.check([s.request_id for s in batch.seqs])
            forward_start = time.perf_counter()
            tokens = prev.sampled.token_ids if prev and prev.sampled else None
            logits = engine.runner.execute(batch, tokens)
            engine.last_step_time += (time.perf_counter() - forward_start
                                      - engine.runner.last_prepare_time)
            sampling = logits.sampling_seqs(batch)
            sampled = (engine.sampler.sample(logits.sample, sampling)
                       if logits.sample is not None else None)
        except EngineDeadError:
            raise
        except Exception as e:
            log.warning("an overlapped step raised (%r): running it step by step", e,
                        exc_info=True)
            if prev is not None:
                self._complete(prev, outputs)
            live = ScheduledBatch()  # without the requests that step finished
            for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
                if not seq.finished:
                    live.seqs.append(seq)
                    live.num_new_tokens.append(n)
            if live:
                engine.run(live, outputs)
            return
        for i, prompt_logits in logits.prompt.items():
            engine.record_prompt_logprobs(batch.seqs[i], prompt_logits)
        advance(batch, sampling)
        self.in_flight = InFlight(batch.seqs, sampling, sampled)
        if prev is not None:
            self._complete(prev, outputs)
        engine.block_manager.cache_full_blocks(batch.seqs)  # every input token is known now

    def _complete(self, step: InFlight, outputs: StepOutputs) -> None:
        """Read a launched step's tokens; requests that ended meanwhile drop theirs."""
        if step.sampled is None:
            return
        sampled = step.sampled.resolve()
        append = self.engine.append_token
        for seq, token, logprob in zip(step.sampling, sampled.token_ids, sampled.logprobs,
                                       strict=True):
            seq.num_pending -= 1
            if seq.status is not FINISHED:  # not the property: read 256 times a step
                append(seq, token, logprob, outputs)
