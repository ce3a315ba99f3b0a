"""Step inputs built from state kept across steps, not from Python lists rebuilt every step.

Each running sequence owns a row of a preallocated block-table array; a row is written when
its sequence joins (or its table was reset by a preemption) and then only where blocks were
appended, so a decode step copies no table. Token ids, positions and slot mappings are then
computed for the whole batch at once from the rows, in NumPy.

    batch = InputBatch(max_num_seqs, max_blocks_per_seq, block_size)
    plan = batch.plan(scheduled)   # a StepPlan with int64 tensors, ready for every rank

With overlapped steps a decode's input token may still be on the device (sampled by the
step in flight, in the sequence's `pending_row`): the plan then holds 0 there and lists
(token row, sampled row) in `pending`, for the runner to fill on the device.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from workers.engine.row_map import RowMap
from workers.engine.scheduler import ScheduledBatch
from workers.engine.sequence import Sequence
from workers.engine.step_plan import StepPlan


class BlockTableRows:
    """One row of block ids per sequence, reused across steps (rows assigned by a RowMap)."""

    def __init__(self, num_rows: int, max_blocks: int) -> None:
        self.table = np.zeros((num_rows, max_blocks), dtype=np.int64)
        self.rows = RowMap(num_rows)
        self.source: list[list[int] | None] = [None] * num_rows  # the list a row mirrors
        self.written = [0] * num_rows  # leading entries of the row already copied

    def rows_of(self, seqs: list[Sequence]) -> tuple[list[int], int]:
        """Each sequence's row, its table brought up to date; and the widest table."""
        rows, source, written = self.rows.rows, self.source, self.written
        out = []
        width = 0
        for seq in seqs:
            row = rows.get(seq.request_id)
            if row is None:
                row = self.rows.assign(seq.request_id, (s.request_id for s in seqs))
                source[row] = None
            table = seq.block_table
            length = len(table)
            if written[row] != length or source[row] is not table:
                self._write(row, table)
            if length > width:
                width = length
            out.append(row)
        return out, width

    def _write(self, row: int, table: list[int]) -> None:
        """Copy the part of table the row lacks (all of it for a new or reset table)."""
        if self.source[row] is not table:
            self.source[row], self.written[row] = table, 0
        done = self.written[row]
        self.table[row, done:len(table)] = table[done:]
        self.written[row] = len(table)

    def release(self, request_id: str) -> None:
        row = self.rows.release(request_id)
        if row is not None:
            self.source[row] = None


class InputBatch:
    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, block_size: int) -> None:
        self.tables = BlockTableRows(max_num_seqs, max_blocks_per_seq)
        self.block_size = block_size

    def release(self, request_id: str) -> None:
        """The request finished: its row is free at once."""
        self.tables.release(request_id)

    def plan(self, batch: ScheduledBatch) -> StepPlan:
        """Flatten the batch into the plan every rank runs."""
        seqs, counts = batch.seqs, batch.num_new_tokens
        rows, width = self.tables.rows_of(seqs)
        begins: list[int] = []
        token_ids: list[int] = []
        pending: list[tuple[int, int]] = []
        in_place = True  # every pending token sits in the row it was sampled in
        sample_rows: list[int] = []
        prompt_rows: list[tuple[int, int, int]] = []  # (batch index, first row, count)
        start = 0
        for i, seq in enumerate(seqs):
            begin, n = seq.num_computed_tokens, counts[i]
            begins.append(begin)
            ids = seq.token_ids
            known = len(ids)
            if begin < known:
                if n == 1:
                    token_ids.append(ids[begin])
                else:
                    token_ids += ids[begin:begin + n]
            else:  # its input is the token in flight
                row = seq.pending_row
                pending.append((start, row))
                in_place = in_place and row == start
                token_ids.append(0)
            if seq.wants_prompt_logprobs and begin < seq.num_prompt_tokens - 1:
                # row j predicts position begin + j + 1
                prompt_rows.append((i, start, min(n, seq.num_prompt_tokens - 1 - begin)))
            start += n
            if begin + n == known + seq.num_pending:  # reaches its last known or in-flight token
                sample_rows.append(start - 1)
        starts = list(itertools.accumulate(counts, initial=0))
        tables = self.tables.table[rows, :width]
        begin_arr = np.fromiter(begins, dtype=np.int64, count=len(begins))
        if start == len(seqs):  # decodes only: one token per sequence
            positions, owner, ends = begin_arr, np.arange(start), begin_arr + 1
        else:
            counts_arr = np.fromiter(counts, dtype=np.int64, count=len(counts))
            owner = np.repeat(np.arange(len(counts)), counts_arr)  # batch index of each token
            first = np.fromiter(starts[:-1], dtype=np.int64, count=len(counts))
            positions = np.arange(start, dtype=np.int64) + np.repeat(begin_arr - first,
                                                                     counts_arr)
            ends = begin_arr + counts_arr
        bs = self.block_size
        slots = tables[owner, positions // bs] * bs + positions % bs
        id_arr = np.fromiter(token_ids, np.int64, len(token_ids))
        return StepPlan(torch.from_numpy(id_arr), torch.from_numpy(positions),
                        torch.from_numpy(slots), starts, ends.tolist(),
                        torch.from_numpy(tables), sample_rows, prompt_rows, pending,
                        in_place and bool(pending) and pending[-1][0] == len(pending) - 1)
