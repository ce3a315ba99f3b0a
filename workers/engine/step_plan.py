"""The step plan: what every rank needs to run one step, and its hand-off from the driver.

The driver flattens a scheduled batch into a StepPlan (token ids, positions, slot mapping,
per-sequence query starts, context lengths and block tables, which rows sample). With more
than one rank it broadcasts the plan as one int64 tensor over the gloo group from rank 0: a
fixed-size header with the lengths, then the payload. With overlapped steps some input tokens
are still on the driver's device (sampled by the step in flight): the plan lists their rows,
and the driver broadcasts the tokens device to device right after it. Workers keep no request
state; a plan of kind STOP ends their loop.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from workers.engine.distributed import ParallelContext

if TYPE_CHECKING:
    from torch.distributed import Work

RUN, STOP = 1, 0
HEADER = 7  # kind, tokens, seqs, table width, sample rows, prompt-logprob rows, in flight


@dataclass
class StepPlan:
    input_ids: list[int] | torch.Tensor
    positions: list[int] | torch.Tensor
    slot_mapping: list[int] | torch.Tensor
    query_start_loc: list[int]  # [num_seqs + 1]
    seq_lens: list[int]  # context length of each sequence after this step
    block_tables: list[list[int]] | torch.Tensor  # padded to the widest table with 0
    sample_rows: list[int]  # rows whose logits are sampled, in batch order
    prompt_rows: list[tuple[int, int, int]]  # (batch index, first row, count) for logprobs
    # (token row, row of the tokens in flight): inputs the previous step sampled, still on the
    # device; on other ranks the rows of the tokens the driver broadcasts after the plan
    pending: list[tuple[int, int]] = field(default_factory=list)
    pending_in_place: bool = False  # pending is [(i, i) for i < len(pending)]: a plain copy

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    @property
    def query_lens(self) -> list[int]:
        starts = self.query_start_loc
        if starts[-1] == len(starts) - 1:  # decodes only: one token each
            return [1] * starts[-1]
        return [b - a for a, b in itertools.pairwise(starts)]

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(header, payload) int64 tensors."""
        tables = torch.as_tensor(self.block_tables, dtype=torch.int64)
        seqs, width = tables.shape
        flat_prompt = [x for row in self.prompt_rows for x in row]
        small = self.query_start_loc + self.seq_lens + self.sample_rows + flat_prompt + \
            [row for row, _ in self.pending]
        parts = (self.input_ids, self.positions, self.slot_mapping, small, tables)
        payload = torch.cat([torch.as_tensor(p, dtype=torch.int64).reshape(-1) for p in parts])
        header = torch.tensor([RUN, self.num_tokens, seqs, width, len(self.sample_rows),
                               len(self.prompt_rows), len(self.pending)], dtype=torch.int64)
        return header, payload

    @classmethod
    def unpack(cls, header: list[int], payload: torch.Tensor) -> StepPlan:
        _, tokens, seqs, width, samples, prompts, in_flight = header
        sizes = [tokens, tokens, tokens, seqs + 1, seqs, samples, 3 * prompts, in_flight,
                 seqs * width]
        ids, pos, slots, starts, lens, rows, prompt, pending, tables = payload.split(sizes)
        flat = prompt.tolist()
        return cls(ids, pos, slots, starts.tolist(), lens.tolist(), tables.view(seqs, width),
                   rows.tolist(), [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)],
                   [(row, i) for i, row in enumerate(pending.tolist())])


def send_plan(plan: StepPlan | None, ctx: ParallelContext) -> None:
    """Rank 0: hand the plan (None: stop) to every other rank."""
    if plan is None:
        header = torch.zeros(HEADER, dtype=torch.int64)
        dist.broadcast(header, 0, group=ctx.cpu_group)
        return
    for work in start_sending_plan(plan, ctx):
        work.wait()


def start_sending_plan(plan: StepPlan, ctx: ParallelContext) -> list[Work]:
    """Rank 0: start handing the plan over and return at once. A later stage of a pipeline
    takes it only when it is done with the steps before; the driver goes on meanwhile. Each
    work holds its tensor until it is done."""
    header, payload = plan.pack()
    works = [dist.broadcast(t, 0, group=ctx.cpu_group, async_op=True) for t in (header, payload)]
    return [w for w in works if w is not None]


def receive_plan(ctx: ParallelContext) -> StepPlan | None:
    """Other ranks: wait for the next plan; None when the driver stops the group."""
    header = torch.empty(HEADER, dtype=torch.int64)
    dist.broadcast(header, 0, group=ctx.cpu_group)
    values = header.tolist()
    if values[0] == STOP:
        return None
    _, tokens, seqs, width, samples, prompts, in_flight = values
    payload = torch.empty(3 * tokens + 2 * seqs + 1 + samples + 3 * prompts + in_flight +
                          seqs * width, dtype=torch.int64)
    dist.broadcast(payload, 0, group=ctx.cpu_group)
    return StepPlan.unpack(values, payload)
