"""The worker ranks of an engine split over devices, and how the driver starts them.

A worker rank is a ModelRunner looping on step plans (`run_worker`). Offline (`LLM`, tests,
benchmarks) the driver starts them as local processes with ProcessWorkers; a Serve replica
starts them as Ray actors in its placement group instead (the replica package's RayWorkers),
through the same small interface: `init_method`, `alive()`, `stop()`.
"""
from __future__ import annotations

import multiprocessing
import random
import socket
from typing import Protocol

from workers.engine.config import EngineConfig


class Workers(Protocol):
    init_method: str  # where rank 0 (the driver) hosts the group's rendezvous

    def alive(self) -> bool: ...

    def stop(self) -> None: ...


# Ray's worker processes listen on 10002-19999 by default; pick ports above them.
PORT_FLOOR = 20000


def ephemeral_port_floor() -> int:
    """The lowest port the kernel hands out for port 0 binds and outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, below the ephemeral range: a port 0 pick could be taken by
    any process binding port 0 or connecting out (Ray starts many) before its user binds it."""
    candidates = range(PORT_FLOOR, ephemeral_port_floor())
    # not the module's generator: a test or benchmark that seeds it would pick the same ports
    for port in random.SystemRandom().sample(candidates, min(64, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tcp_init_method(host: str = "127.0.0.1") -> str:
    return f"tcp://{host}:{free_port(host)}"


def run_worker(config: EngineConfig, rank: int, init_method: str) -> None:
    """The whole life of a worker rank: load its shard, run plans until the driver stops."""
    from workers.engine.model_runner import (  # torch loads in the worker only
        ModelRunner,
        prepare_step_thread,
        resolve_device,
    )

    prepare_step_thread(resolve_device(config.device, rank))
    ModelRunner(config, rank, init_method).serve_forever()


class ProcessWorkers:
    """Ranks 1..world-1 as spawned processes on this machine."""

    def __init__(self, config: EngineConfig) -> None:
        self.init_method = tcp_init_method()
        spawn = multiprocessing.get_context("spawn")
        self.processes = [
            spawn.Process(target=run_worker, args=(config, rank, self.init_method),
                          name=f"pagoda-rank-{rank}", daemon=True)
            for rank in range(1, config.world_size)]
        for process in self.processes:
            process.start()

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.processes)

    def stop(self, timeout_s: float = 10.0) -> None:
        for process in self.processes:
            process.join(timeout_s)
            if process.is_alive():
                process.kill()
                process.join()
