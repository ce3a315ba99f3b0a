"""A step launched on the device whose sampled tokens the host has not read yet."""
from __future__ import annotations

from dataclasses import dataclass

from workers.engine.sampler import SampledTokens
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
