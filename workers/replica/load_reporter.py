"""A replica's side of the LoadTracker: report load a few times a second, unregister on stop."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ray.actor import ActorHandle
from ray.exceptions import RayError

from workers.tracker.load_tracker import ReplicaLoad, get_or_create_tracker

logger = logging.getLogger("ray.serve")


class LoadReporter:
    """Sends `ReplicaLoad` from `read_stats()` every `interval_s`; hashes only when they change.

    `read_stats` returns `engine.stats()` plus `num_requests`. A lost tracker (killed, restarted)
    is looked up or created again on the next tick, and the hashes are resent in full.
    """

    def __init__(self, replica_id: str, block_size: int, read_stats: Callable[[], dict],
                 interval_s: float, timeout_s: float = 5.0) -> None:
        self.replica_id = replica_id
        self.block_size = block_size
        self.read_stats = read_stats
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.tracker: ActorHandle | None = None
        self.hashes: frozenset[int] = frozenset()
        self.hash_version = 0
        self.tracker_has_hashes = False
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.report_forever())

    async def report_forever(self) -> None:
        while True:
            try:
                await self.report_once()
            except (RayError, TimeoutError) as e:  # tracker died or is slow: find it next tick
                logger.warning("load report failed: %r", e)
                self.tracker = None
                self.tracker_has_hashes = False
            await asyncio.sleep(self.interval_s)

    async def report_once(self) -> None:
        stats = self.read_stats()
        hashes = frozenset(stats.get("cached_block_hashes", ()))
        if hashes != self.hashes:
            self.hashes = hashes
            self.hash_version += 1
            self.tracker_has_hashes = False
        load = ReplicaLoad(
            replica_id=self.replica_id, num_running=stats.get("num_running", 0),
            num_waiting=stats.get("num_waiting", 0), kv_usage=stats.get("kv_usage", 0.0),
            block_size=self.block_size, num_requests=stats.get("num_requests", 0),
            prefix_cache_queries=stats.get("prefix_cache_queries", 0),
            prefix_cache_hits=stats.get("prefix_cache_hits", 0),
            num_preemptions=stats.get("num_preemptions", 0), hash_version=self.hash_version)
        if self.tracker is None:
            self.tracker = await asyncio.get_running_loop().run_in_executor(
                None, get_or_create_tracker)
        sent = None if self.tracker_has_hashes else sorted(self.hashes)
        ok: bool = await asyncio.wait_for(self.tracker.report.remote(load, sent), self.timeout_s)
        self.tracker_has_hashes = bool(ok)

    async def stop(self) -> None:
        """Stops reporting and unregisters, so routers stop choosing this replica at once."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None
        if self.tracker is not None:
            try:
                await asyncio.wait_for(self.tracker.unregister.remote(self.replica_id),
                                       self.timeout_s)
            except (RayError, TimeoutError) as e:  # the tracker drops silent replicas itself
                logger.warning("unregister failed: %r", e)
