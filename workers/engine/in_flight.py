"""Steps launched whose sampled tokens the host has not read yet: an overlapped step, and the
micro-batches of a pipeline."""
from __future__ import annotations

from dataclasses import dataclass

from workers.engine.model_runner import LaunchedStep
from workers.engine.sampler import SampledTokens
from workers.engine.scheduler import ScheduledBatch
from workers.engine.sequence import Sequence


@dataclass
class InFlight:
    """A launched step whose sampled tokens are still on the device."""

    seqs: list[Sequence]  # every sequence of the step
    sampling: list[Sequence]  # those that sample, in the order of `sampled`
    sampled: SampledTokens | None

    @property
    def rows(self) -> dict[str, int]:
        return {s.request_id: i for i, s in enumerate(self.sampling)}


def needs_history(seq: Sequence) -> bool:
    """Sampling it reads its previous tokens on the host: it cannot overlap their step."""
    p = seq.params
    return seq.grammar is not None or seq.num_output_tokens < p.min_tokens or bool(
        p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)


@dataclass
class MicroBatch:
    """A step in a pipeline: its first stage ran, its logits are not back yet."""

    batch: ScheduledBatch
    sampling: list[Sequence]  # those that sample, in the order of the logits rows
    begins: list[int]  # each sequence's computed tokens at launch (its prompt-logprob rows)
    launched: LaunchedStep
