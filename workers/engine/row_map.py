"""Request id -> row of a preallocated per-request array, for state kept across steps.

A request's row is freed when it ends. A batch never holds more requests than there are rows,
so a newcomer finding none free takes the row of a request outside its batch (one that was
preempted and waits); that request gets a row again, written anew, when it next runs.
"""
from __future__ import annotations

from collections.abc import Iterable


class RowMap:
    def __init__(self, num_rows: int) -> None:
        self.rows: dict[str, int] = {}
        self.free = list(range(num_rows - 1, -1, -1))

    def assign(self, request_id: str, batch: Iterable[str]) -> int:
        """A row for request_id, which holds none; batch: the request ids of its step (read
        only when no row is free)."""
        if self.free:
            row = self.free.pop()
        else:
            in_batch = set(batch)
            row = self.rows.pop(next(r for r in self.rows if r not in in_batch))
        self.rows[request_id] = row
        return row

    def release(self, request_id: str) -> int | None:
        """The request ended: its row, now free, if it had one."""
        row = self.rows.pop(request_id, None)
        if row is not None:
            self.free.append(row)
        return row
