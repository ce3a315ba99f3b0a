"""A step's integer inputs to the device in one copy, from pinned host memory on CUDA.

Token ids, positions, slot mapping, query starts, context lengths and block tables would be
six host-to-device copies per step, each from pageable memory, which the driver first copies
into a staging buffer of its own while the host waits. Instead they are packed into one int64
host buffer, page-locked on CUDA so the copy is truly asynchronous, copied at once and split
into views on the device. Two buffers alternate: the host packs step N+1 while step N's copy
may still be reading the other (an event says when it is done). On a CPU the inputs already
are where the forward reads them: nothing is packed or copied (`pack` forces it, for tests).

    staging = InputStaging(device)
    ids, positions, slots = staging.to_device([ids, positions, slots])
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


class InputStaging:
    def __init__(self, device: torch.device, pack: bool | None = None) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self.pack = self.pinned if pack is None else pack
        self.buffers = [torch.empty(0, dtype=torch.int64) for _ in range(2)]
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def to_device(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """int64 tensors on the host -> the same on the device, each its own shape."""
        if not self.pack:
            return [p.to(self.device, non_blocking=True) for p in parts]
        sizes = [p.numel() for p in parts]
        host = self._host_buffer(sum(sizes))
        torch.cat([p.reshape(-1) for p in parts], out=host)
        packed = host.to(self.device, non_blocking=self.pinned, copy=True)
        if self.pinned:
            event = torch.cuda.Event()
            event.record()
            self.copied[self.turn] = event
        return [t.view(p.shape) for t, p in zip(packed.split(sizes), parts, strict=True)]

    def _host_buffer(self, n: int) -> torch.Tensor:
        """The buffer whose last copy is older; grown (doubling) when n does not fit."""
        self.turn ^= 1
        copied = self.copied[self.turn]
        if copied is not None:
            copied.synchronize()  # the copy of two steps ago: long done
        buffer = self.buffers[self.turn]
        if buffer.numel() < n:
            buffer = torch.empty(max(n, 2 * buffer.numel()), dtype=torch.int64,
                                 pin_memory=self.pinned)
            self.buffers[self.turn] = buffer
        return buffer[:n]
