"""Steps launched whose sampled tokens the host has not read yet: an overlapped step, and the
micro-batches of a pipeline; and what both use of the engine that owns them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from workers.engine.block_manager import BlockManager
from workers.engine.fault_injection import FaultInjector
from workers.engine.model_runner import LaunchedStep, ModelRunner
from workers.engine.sampler import SampledTokens, Sampler
from workers.engine.scheduler import ScheduledBatch, Scheduler
from workers.engine.sequence import Sequence
from workers.engine.step_outputs import StepOutputs


class Engine(Protocol):
    """What overlapped steps and a pipeline use of the engine that owns them (LLMEngine)."""

    scheduler: Scheduler
    runner: ModelRunner
    sampler: Sampler
    block_manager: BlockManager
    faults: FaultInjector
    last_step_time: float

    def run(self, batch: ScheduledBatch, outputs: StepOutputs) -> None: ...

    def fail(self, seq: Sequence, error: Exception) -> None: ...

    def append_token(self, seq: Sequence, token: int, logprob, outputs: StepOutputs) -> None: ...

    def record_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor,
                               begin: int | None = None) -> None: ...


@dataclass
class InFlight:
    """A launched step whose sampled tokens are still on the device."""

    seqs: list[Sequence]  # every sequence of the step
    sampling: list[Sequence]  # those that sample, in the order of `sampled`
    sampled: SampledTokens | None


@dataclass
class MicroBatch:
    """A step in a pipeline: its first stage ran, its logits are not back yet."""

    batch: ScheduledBatch
    sampling: list[Sequence]  # those that sample, in the order of the logits rows
    begins: list[int]  # each sequence's computed tokens at launch (its prompt-logprob rows)
    launched: LaunchedStep


def advance(batch: ScheduledBatch, sampling: list[Sequence]) -> None:
    """The batch is launched: its tokens count as computed, its sampled tokens as pending
    (each in its row of the sampled tokens)."""
    if sampling is batch.seqs:  # every sequence samples: one pass
        for row, (seq, n) in enumerate(zip(sampling, batch.num_new_tokens, strict=True)):
            seq.num_computed_tokens += n
            seq.num_pending += 1
            seq.pending_row = row
        return
    for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        seq.num_computed_tokens += n
    for row, seq in enumerate(sampling):
        seq.num_pending += 1
        seq.pending_row = row


def needs_history(seq: Sequence) -> bool:
    """Sampling it reads its previous tokens on the host: it cannot overlap their step."""
    p = seq.params
    return seq.grammar is not None or seq.num_output_tokens < p.min_tokens or bool(
        p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)
