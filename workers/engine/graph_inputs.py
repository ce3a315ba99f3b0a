"""The per-token inputs a captured CUDA graph reads: static buffers that a step's values are
copied into before each replay, padded to the graph's bucket. Used by the decode graphs
(`cuda_graph.py`) and the mixed steps' piecewise graphs (`piecewise_graph.py`)."""
from __future__ import annotations

import torch


class StaticInputs:
    def __init__(self, rows: int, device: torch.device, pad_slot: int = -1,
                 stage_input: tuple[int, torch.dtype] | None = None) -> None:
        self.pad_slot = pad_slot
        self.input_ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((rows,), pad_slot, dtype=torch.int64, device=device)
        # a later pipeline stage's inputs: the previous stage's hidden states and residual
        self.intermediate: tuple[torch.Tensor, torch.Tensor] | None = None
        if stage_input is not None:
            hidden_size, dtype = stage_input
            hidden = torch.zeros(rows, hidden_size, dtype=dtype, device=device)
            self.intermediate = (hidden, torch.zeros_like(hidden))

    def copy_in(self, size: int, input_ids: torch.Tensor, positions: torch.Tensor,
                slot_mapping: torch.Tensor,
                intermediate: tuple[torch.Tensor, ...] | None = None) -> None:
        """A step's n tokens into rows :n. Rows n:size get the pad slot, so they write no K/V;
        their ids, positions and hidden states keep what an earlier step left there: valid,
        finite values, in rows whose results nobody reads."""
        n = input_ids.shape[0]
        if (intermediate is None) != (self.intermediate is None):
            raise ValueError("a later pipeline stage's graphs run from the previous stage's "
                             "(hidden, residual), and only they do")
        for static, given in zip(self.intermediate or (), intermediate or (), strict=True):
            static[:n].copy_(given, non_blocking=True)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(slot_mapping, non_blocking=True)
        self.slot_mapping[n:size].fill_(self.pad_slot)

    def stage_args(self, size: int) -> tuple[torch.Tensor, ...] | None:
        """A later stage's (hidden, residual) rows of a `size` bucket; None on the first."""
        return None if self.intermediate is None else tuple(t[:size] for t in self.intermediate)
