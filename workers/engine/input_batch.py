"""Step inputs built from state kept across steps, not from Python lists rebuilt every step.

Each running sequence owns a row of a preallocated block-table array; a row is written when
its sequence joins (or its table was reset by a preemption) and then only where blocks were
appended, so a decode step copies no table. Token ids, positions and slot mappings are then
computed for the whole batch at once from the rows, in NumPy.

    batch = InputBatch(max_num_seqs, max_blocks_per_seq, block_size)
    plan = batch.plan(scheduled)   # a StepPlan with int64 tensors, ready for every rank

With overlapped steps a decode's input token may still be on the device (sampled by the
step in flight): the plan then holds 0 there and lists (token row, sampled row) in `pending`,
for the runner to fill on the device.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np
import torch

from workers.engine.scheduler import ScheduledBatch
from workers.engine.sequence import Sequence
from workers.engine.step_plan import StepPlan


class BlockTableRows:
    """One row of block ids per sequence, reused across steps; least recently used rows are
    handed to newcomers (a batch never holds more sequences than there are rows)."""

    def __init__(self, num_rows: int, max_blocks: int) -> None:
        self.table = np.zeros((num_rows, max_blocks), dtype=np.int64)
        self.rows: OrderedDict[str, int] = OrderedDict()  # request id -> row, oldest first
        self.source: list[list[int] | None] = [None] * num_rows  # the list a row mirrors
        self.written = [0] * num_rows  # leading entries of the row already copied
        self.free = list(range(num_rows - 1, -1, -1))

    def rows_of(self, seqs: list[Sequence]) -> list[int]:
        """Each sequence's row, its table brought up to date."""
        rows = self.rows
        out = []
        for seq in seqs:
            table = seq.block_table
            row = rows.get(seq.request_id)
            if row is None:
                row = self.free.pop() if self.free else rows.popitem(last=False)[1]
                rows[seq.request_id] = row
            else:
                rows.move_to_end(seq.request_id)
            if self.source[row] is not table:  # a newcomer, or a table reset by preemption
                self.source[row], self.written[row] = table, 0
            done = self.written[row]
            if done < len(table):
                self.table[row, done:len(table)] = table[done:]
                self.written[row] = len(table)
            out.append(row)
        return out

    def release(self, request_id: str) -> None:
        row = self.rows.pop(request_id, None)
        if row is not None:
            self.source[row] = None
            self.free.append(row)


class InputBatch:
    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, block_size: int) -> None:
        self.tables = BlockTableRows(max_num_seqs, max_blocks_per_seq)
        self.block_size = block_size

    def release(self, request_id: str) -> None:
        """The request finished: its row is free at once."""
        self.tables.release(request_id)

    def plan(self, batch: ScheduledBatch, sampled_rows: dict[str, int] | None = None) -> StepPlan:
        """Flatten the batch into the plan every rank runs; sampled_rows: the row of each
        request's token in the step in flight."""
        seqs, counts = batch.seqs, batch.num_new_tokens
        rows = self.tables.rows_of(seqs)
        begins = [seq.num_computed_tokens for seq in seqs]
        token_ids: list[int] = []
        pending: list[tuple[int, int]] = []
        start = 0
        for seq, begin, n in zip(seqs, begins, counts, strict=True):
            ids = seq.token_ids
            if begin < len(ids):
                token_ids += ids[begin:begin + n]
            else:  # its input is the token in flight
                assert sampled_rows is not None, "a token in flight needs the step it is in"
                pending.append((start, sampled_rows[seq.request_id]))
                token_ids.append(0)
            start += n
        starts = list(itertools.accumulate(counts, initial=0))
        ends = [b + n for b, n in zip(begins, counts, strict=True)]
        # a sequence samples when this step reaches its last known (or in-flight) token
        scheduled = [s.num_scheduled_tokens for s in seqs]
        sample_rows = list(range(start)) if ends == scheduled and start == len(seqs) else [
            last - 1 for last, end, known in zip(starts[1:], ends, scheduled, strict=True)
            if end == known]
        prompt_rows = [  # (batch index, first row, count): row j predicts position begin + j + 1
            (i, starts[i], min(counts[i], seq.num_prompt_tokens - 1 - begins[i]))
            for i, seq in enumerate(seqs) if seq.params.prompt_logprobs is not None
            and begins[i] < seq.num_prompt_tokens - 1]
        width = max([len(seq.block_table) for seq in seqs])
        tables = self.tables.table[rows, :width]
        begin_arr = np.fromiter(begins, dtype=np.int64, count=len(begins))
        if start == len(seqs):  # decodes only: one token per sequence
            positions, owner = begin_arr, np.arange(start)
        else:
            counts_arr = np.fromiter(counts, dtype=np.int64, count=len(counts))
            owner = np.repeat(np.arange(len(counts)), counts_arr)  # batch index of each token
            first = np.fromiter(starts[:-1], dtype=np.int64, count=len(counts))
            positions = np.arange(start, dtype=np.int64) + np.repeat(begin_arr - first,
                                                                     counts_arr)
        bs = self.block_size
        slots = tables[owner, positions // bs] * bs + positions % bs
        id_arr = np.fromiter(token_ids, np.int64, len(token_ids))
        return StepPlan(torch.from_numpy(id_arr), torch.from_numpy(positions),
                        torch.from_numpy(slots), starts, ends, torch.from_numpy(tables),
                        sample_rows, prompt_rows, pending)
