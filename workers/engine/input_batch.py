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

    def row(self, seq: Sequence) -> int:
        """seq's row, its table brought up to date."""
        table = seq.block_table
        row = self.rows.get(seq.request_id)
        if row is None:
            row = self.free.pop() if self.free else self.rows.popitem(last=False)[1]
            self.rows[seq.request_id] = row
        else:
            self.rows.move_to_end(seq.request_id)
        if self.source[row] is not table:  # a newcomer, or a table reset by preemption
            self.source[row], self.written[row] = table, 0
        done = self.written[row]
        if done < len(table):
            self.table[row, done:len(table)] = table[done:]
            self.written[row] = len(table)
        return row

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
        rows, begins, token_ids = [], [], []
        pending: list[tuple[int, int]] = []
        sample_rows: list[int] = []
        prompt_rows: list[tuple[int, int, int]] = []  # (batch index, first row, count)
        width = start = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            rows.append(self.tables.row(seq))
            begin = seq.num_computed_tokens
            begins.append(begin)
            if n == 1 and begin == seq.num_tokens:  # its input is the token in flight
                assert sampled_rows is not None, "a token in flight needs the step it is in"
                pending.append((start, sampled_rows[seq.request_id]))
                token_ids.append(0)
            elif n == 1:
                token_ids.append(seq.token_ids[begin])
            else:
                token_ids += seq.token_ids[begin:begin + n]
            width = max(width, len(seq.block_table))
            start += n
            if begin + n == seq.num_scheduled_tokens:
                sample_rows.append(start - 1)
            if seq.params.prompt_logprobs is not None and begin < seq.num_prompt_tokens - 1:
                # row j predicts the token at position begin + j + 1
                prompt_rows.append((i, start - n, min(n, seq.num_prompt_tokens - 1 - begin)))
        counts = np.asarray(batch.num_new_tokens, dtype=np.int64)
        starts = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        begin_arr = np.asarray(begins, dtype=np.int64)
        owner = np.repeat(np.arange(len(counts)), counts)  # the batch index of every token
        positions = np.arange(start, dtype=np.int64) + np.repeat(begin_arr - starts[:-1], counts)
        tables = self.tables.table[rows, :width]
        bs = self.block_size
        slots = tables[owner, positions // bs] * bs + positions % bs
        return StepPlan(torch.tensor(token_ids, dtype=torch.int64), torch.from_numpy(positions),
                        torch.from_numpy(slots), starts.tolist(), (begin_arr + counts).tolist(),
                        torch.from_numpy(tables), sample_rows, prompt_rows, pending)
