"""The scheduler actor: one named Ray actor that knows every replica's load.

Replicas report a few times a second (running, waiting, KV usage and the hashes of their cached
prefix blocks); request routers read `snapshot()` in the background and never per request.
A replica that stops reporting is dropped after `drop_after_s`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import cast

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

TRACKER_NAME = "pagoda-load-tracker"
TRACKER_NAMESPACE = "pagoda"
UNKNOWN_VERSION = -1


@dataclass
class ReplicaLoad:
    """One replica's last report; counters are totals since the replica started."""

    replica_id: str
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # 0..1
    block_size: int = 16
    num_requests: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    hash_version: int = 0  # bumped by the replica whenever its cached block hashes change
    reported_at: float = 0.0  # tracker clock


@dataclass
class Snapshot:
    """Loads of every live replica; `block_hashes` holds only the sets the reader lacks."""

    loads: dict[str, ReplicaLoad] = field(default_factory=dict)
    block_hashes: dict[str, list[int]] = field(default_factory=dict)
    taken_at: float = 0.0


class LoadTracker:
    def __init__(self, drop_after_s: float = 5.0) -> None:
        self.drop_after_s = drop_after_s
        self.loads: dict[str, ReplicaLoad] = {}
        self.block_hashes: dict[str, list[int]] = {}

    def report(self, load: ReplicaLoad, block_hashes: list[int] | None = None) -> bool:
        """Upserts one replica's load; hashes are None when unchanged since the last report.

        Returns False when the tracker lacks the replica's current hashes (it restarted or
        missed a report), asking the replica to send them in full next time.
        """
        load.reported_at = time.time()
        known = self.loads.get(load.replica_id)
        self.loads[load.replica_id] = load
        if block_hashes is not None:
            self.block_hashes[load.replica_id] = list(block_hashes)
            return True
        if known is not None and known.hash_version == load.hash_version \
                and load.replica_id in self.block_hashes:
            return True
        load.hash_version = UNKNOWN_VERSION  # so readers fetch the hashes once they arrive
        return False

    def unregister(self, replica_id: str) -> None:
        self.loads.pop(replica_id, None)
        self.block_hashes.pop(replica_id, None)

    def snapshot(self, known_versions: dict[str, int] | None = None) -> Snapshot:
        """Live loads, with the hashes of replicas whose hash_version differs from
        known_versions."""
        self.drop_stale()
        known_versions = known_versions or {}
        changed = {rid: self.block_hashes.get(rid, []) for rid, load in self.loads.items()
                   if known_versions.get(rid) != load.hash_version}
        return Snapshot(loads=dict(self.loads), block_hashes=changed, taken_at=time.time())

    def drop_stale(self) -> list[str]:
        """Forgets replicas that stopped reporting (died without unregistering)."""
        now = time.time()
        stale = [rid for rid, load in self.loads.items()
                 if now - load.reported_at > self.drop_after_s]
        for rid in stale:
            self.unregister(rid)
        return stale


def get_or_create_tracker(drop_after_s: float = 5.0) -> ray.actor.ActorHandle:
    """The one tracker of this Ray cluster; detached so it outlives the replica that made it,
    and outside that replica's placement group, which Serve removes with the replica."""
    # Ray types the strategy's group as required, though None means "no group", and a new
    # actor as `ActorHandle | type`; it is always a handle
    outside_groups = PlacementGroupSchedulingStrategy(placement_group=None)  # type: ignore[arg-type]
    return cast(ray.actor.ActorHandle, ray.remote(LoadTracker).options(
        name=TRACKER_NAME, namespace=TRACKER_NAMESPACE, get_if_exists=True,
        lifetime="detached", num_cpus=0, max_restarts=-1, scheduling_strategy=outside_groups,
    ).remote(drop_after_s))


def find_tracker() -> ray.actor.ActorHandle | None:
    """The tracker if one is running; routers only read, replicas create it."""
    try:
        return ray.get_actor(TRACKER_NAME, namespace=TRACKER_NAMESPACE)
    except ValueError:
        return None
