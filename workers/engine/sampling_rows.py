"""Each running request's sampling parameters in one row of preallocated tables.

A request's temperature, top-k, top-p and min-p are written to its row once, when it first
samples: into the host table (pinned memory on a GPU) and, with one copy for all of a step's
newcomers, into the device table. A step then reads its requests' parameters with one index
copy and a gather on the device, instead of a list per parameter built from every request's
SamplingParams and copied over; which filters any row needs is read from the host table.
"""
from __future__ import annotations

import numpy as np
import torch

from workers.engine.row_map import RowMap
from workers.engine.sampling_params import SamplingParams
from workers.engine.sequence import Sequence

TEMPERATURE, TOP_K, TOP_P, MIN_P = range(4)


class SamplingRows:
    def __init__(self, num_rows: int, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.host = torch.zeros(num_rows, 4, pin_memory=device.type == "cuda")
        self.host_view = self.host.numpy()
        # on a CPU the host table is the device table
        self.table = self.host if device.type == "cpu" else torch.zeros(num_rows, 4,
                                                                         device=device)
        self.rows = RowMap(num_rows)

    def gather(self, seqs: list[Sequence]) -> tuple[torch.Tensor, np.ndarray]:
        """The parameters of seqs, a row each: [len(seqs), 4] on the device and on the host."""
        rows = self.rows.rows
        index = []
        new = []
        for seq in seqs:
            row = rows.get(seq.request_id)
            if row is None:
                row = self.rows.assign(seq.request_id, (s.request_id for s in seqs))
                self._write(row, seq.params)
                new.append(row)
            index.append(row)
        if new and self.table is not self.host:
            new_rows = torch.tensor(new, device=self.device)
            self.table[new_rows] = self.host[new].to(self.device, non_blocking=True)
        host_index = np.array(index)
        device_index = torch.from_numpy(host_index).to(self.device, non_blocking=True)
        return self.table[device_index], self.host_view[host_index]

    def _write(self, row: int, params: SamplingParams) -> None:
        top_k = params.top_k if 0 < params.top_k < self.vocab_size else self.vocab_size
        self.host_view[row] = (params.temperature, top_k, params.top_p, params.min_p)

    def release(self, request_id: str) -> None:
        self.rows.release(request_id)
