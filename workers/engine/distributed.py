"""Process groups of one model replica split over devices (tensor x pipeline parallel).

Rank r of a world of tp * pp is tensor rank r % tp of pipeline stage r // tp. Rank 0 is the
driver: it runs the scheduler and sampler and is also tensor rank 0 of the first stage. Two
groups span the world: `cpu` (gloo) carries step plans, `device` (NCCL on GPUs, gloo on CPUs)
carries activations; each stage has its own tensor-parallel group.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup, Work

# a worker waits for its next step plan as long as the replica is idle
PLAN_TIMEOUT = datetime.timedelta(days=7)
STEP_TIMEOUT = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class ParallelContext:
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0
    tp_group: ProcessGroup | None = field(default=None, repr=False)
    device_group: ProcessGroup | None = field(default=None, repr=False)
    cpu_group: ProcessGroup | None = field(default=None, repr=False)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def rank_of(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the tensor-parallel group, in place; identity without one."""
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def gather_vocab(self, local: torch.Tensor) -> torch.Tensor | None:
        """Concatenate vocab shards along the last dim on tensor rank 0; None elsewhere."""
        if self.tp_size == 1:
            return local
        local = local.contiguous()
        first = self.rank_of(self.pp_rank, 0)
        parts = [torch.empty_like(local) for _ in range(self.tp_size)] \
            if self.tp_rank == 0 else None
        dist.gather(local, parts, dst=first, group=self.tp_group)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def send_to_next_stage(self, *tensors: torch.Tensor) -> list[Send]:
        """Start sending; the stage goes on with its next step while the next stage is busy."""
        return [isend(t, self.rank_of(self.pp_rank + 1, self.tp_rank), self.device_group)
                for t in tensors]

    def recv_from_previous_stage(self, *empties: torch.Tensor) -> tuple[torch.Tensor, ...]:
        peer = self.rank_of(self.pp_rank - 1, self.tp_rank)
        for t in empties:
            dist.recv(t, peer, group=self.device_group)
        return empties


@dataclass(frozen=True)
class Send:
    """A point-to-point send in progress and its tensor, kept alive until it is done."""

    work: Work
    tensor: torch.Tensor


def isend(tensor: torch.Tensor, peer: int, group: ProcessGroup | None) -> Send:
    tensor = tensor.contiguous()
    work = dist.isend(tensor, peer, group=group)
    assert work is not None, "isend returns its work"
    return Send(work, tensor)


def wait_all(sends: list[Send]) -> None:
    for send in sends:
        send.work.wait()


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """The layers of one pipeline stage; earlier stages take the remainder."""
    if num_layers < pp_size:
        raise ValueError(f"{num_layers} layers cannot be split into {pp_size} pipeline stages")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (pp_rank < extra))


def init_parallel(tp_size: int, pp_size: int, rank: int, init_method: str,
                  device: torch.device) -> ParallelContext:
    """Join the replica's process group; every rank calls this with the same sizes."""
    world = tp_size * pp_size
    if world == 1:
        return ParallelContext()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, world_size=world, rank=rank,
                            timeout=STEP_TIMEOUT)
    device_group = dist.group.WORLD
    cpu_group = dist.new_group(backend="gloo", timeout=PLAN_TIMEOUT)
    tp_group = None
    for stage in range(pp_size):  # every rank creates every group, in the same order
        ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.new_group(ranks, backend=backend, timeout=STEP_TIMEOUT)
        if rank in ranks:
            tp_group = group
    return ParallelContext(tp_size, pp_size, rank, tp_group, device_group, cpu_group)


def destroy_parallel(ctx: ParallelContext) -> None:
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
