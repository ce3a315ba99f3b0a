"""Serve request router for model replicas: prefix affinity and least load from the tracker.

A background task refreshes the LoadTracker snapshot every `refresh_interval_s`, so choosing a
replica is a local computation with no round-trip per request. When the snapshot is older than
`snapshot_max_age_s` (tracker killed or unreachable) the router falls back to power of two.

Configured per deployment with
`request_router_config: {request_router_class: workers.router.request_router:PagodaRequestRouter}`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

from ray.actor import ActorHandle
from ray.exceptions import RayError
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from workers.engine.block_hash import compute_block_hashes
from workers.router.routing_policy import (
    ReplicaView,
    RoutingPolicy,
    power_of_two,
    rank_replicas,
)
from workers.tracker.load_tracker import Snapshot, find_tracker

logger = logging.getLogger("ray.serve")
MAX_EXPECTED_HASHES = 65536
MAX_STEERED = 4096


def prompt_token_ids_of(request: PendingRequest | None) -> list[int]:
    """The prompt of a `generate(prompt_token_ids, params, request_id)` call, if any."""
    if request is None:
        return []
    tokens = request.kwargs.get("prompt_token_ids")
    if tokens is None and request.args:
        tokens = request.args[0]
    return tokens if isinstance(tokens, list) else []


def avoided_replicas_of(request: PendingRequest | None) -> set[str]:
    """Replicas a resumed request was lost on (`generate(..., avoid_replicas=[...])`)."""
    avoid = request.kwargs.get("avoid_replicas") if request is not None else None
    return set(avoid) if isinstance(avoid, list) else set()


class PagodaRequestRouter(RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        self.policy = RoutingPolicy(**kwargs)
        self.views: dict[str, ReplicaView] = {}
        self.hash_versions: dict[str, int] = {}
        self.reported_at: dict[str, float] = {}
        self.block_sizes: dict[str, int] = {}
        self.routed_since_report: defaultdict[str, int] = defaultdict(int)
        # request -> replica it was steered to; counted at once, so that a burst of choices
        # made before any is routed sees the earlier ones instead of herding onto one replica
        self.steered: dict[str, str] = {}
        # prompts this router sent, counted as cached until the replica's next hash report
        self.expected_hashes: defaultdict[str, set[int]] = defaultdict(set)
        self.snapshot_at = 0.0  # monotonic time of the last successful refresh
        self.refresher: asyncio.Task | None = None
        self.tracker: ActorHandle | None = None

    # refresh

    def ensure_refresher(self) -> None:
        if self.refresher is None or self.refresher.done():
            self.refresher = asyncio.get_running_loop().create_task(self.refresh_forever())

    async def refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except (RayError, TimeoutError) as e:  # tracker gone: old snapshot goes stale
                logger.debug("load snapshot refresh failed: %r", e)
                self.tracker = None
            await asyncio.sleep(self.policy.refresh_interval_s)

    async def refresh(self) -> None:
        if self.tracker is None:
            self.tracker = await asyncio.get_running_loop().run_in_executor(None, find_tracker)
            if self.tracker is None:
                return
        snapshot: Snapshot = await asyncio.wait_for(
            self.tracker.snapshot.remote(dict(self.hash_versions)),
            timeout=self.policy.snapshot_max_age_s)
        self.apply(snapshot)

    def apply(self, snapshot: Snapshot) -> None:
        """Replaces the views with a fresh snapshot, keeping hashes that did not change."""
        views: dict[str, ReplicaView] = {}
        for rid, load in snapshot.loads.items():
            if load.reported_at != self.reported_at.get(rid):
                self.routed_since_report.pop(rid, None)
            if rid in snapshot.block_hashes:
                hashes = frozenset(snapshot.block_hashes[rid])
                self.expected_hashes.pop(rid, None)
            else:
                hashes = self.views[rid].cached_hashes if rid in self.views else frozenset()
            views[rid] = ReplicaView(num_running=load.num_running, num_waiting=load.num_waiting,
                                     kv_usage=load.kv_usage, cached_hashes=hashes)
            self.hash_versions[rid] = load.hash_version
            self.reported_at[rid] = load.reported_at
            self.block_sizes[rid] = load.block_size
        for rid in set(self.hash_versions) - set(views):
            for table in (self.hash_versions, self.reported_at, self.block_sizes,
                          self.routed_since_report, self.expected_hashes):
                table.pop(rid, None)
        self.views = views
        self.snapshot_at = time.monotonic()

    def snapshot_fresh(self) -> bool:
        return time.monotonic() - self.snapshot_at <= self.policy.snapshot_max_age_s

    # choice

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        self.ensure_refresher()
        if pending_request is not None:
            # every candidate is offered at once: when all are full, Serve must sleep before
            # asking again instead of re-probing the replicas in a tight loop
            pending_request.routing_context.should_backoff = True
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        avoid = avoided_replicas_of(pending_request)
        if avoid and set(by_id) - avoid:  # a resumed request shuns where it was lost
            by_id = {rid: r for rid, r in by_id.items() if rid not in avoid}
        if not by_id:
            return []
        if self.policy.mode == "power_of_two" or not self.snapshot_fresh():
            return [[by_id[rid] for rid in power_of_two(list(by_id))]]
        tokens = prompt_token_ids_of(pending_request)
        ranked = rank_replicas(list(by_id), self.current_views(),
                               self.prompt_hashes(tokens, list(by_id)), self.policy)
        if pending_request is not None and ranked:
            self.steer(pending_request.metadata.internal_request_id, ranked[0])
        # one replica per rank: Serve tries them in order, skipping replicas that are full
        return [[by_id[rid]] for rid in ranked]

    def current_views(self) -> dict[str, ReplicaView]:
        views = {}
        for rid, view in self.views.items():
            extra = self.expected_hashes.get(rid)
            views[rid] = ReplicaView(
                num_running=view.num_running, num_waiting=view.num_waiting,
                kv_usage=view.kv_usage, routed_since_report=self.routed_since_report[rid],
                cached_hashes=view.cached_hashes | extra if extra else view.cached_hashes)
        return views

    def prompt_hashes(self, token_ids: list[int], replica_ids: list[str]) -> list[int]:
        # replicas of one deployment share an engine config, hence one block size; the
        # tracker may also list other deployments' replicas
        sizes = [self.block_sizes[rid] for rid in replica_ids if rid in self.block_sizes]
        if not token_ids or not sizes:
            return []
        return compute_block_hashes(token_ids, sizes[0])

    def steer(self, request: str, rid: str) -> None:
        self.unsteer(request)
        if len(self.steered) > MAX_STEERED:  # requests cancelled before they were routed
            self.steered.clear()
        self.steered[request] = rid
        self.routed_since_report[rid] += 1

    def unsteer(self, request: str) -> None:
        rid = self.steered.pop(request, None)
        if rid is not None and self.routed_since_report.get(rid, 0) > 0:
            self.routed_since_report[rid] -= 1

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result) -> None:
        rid = replica_id.unique_id
        self.unsteer(pending_request.metadata.internal_request_id)
        self.routed_since_report[rid] += 1
        hashes = self.prompt_hashes(prompt_token_ids_of(pending_request), [rid])
        if hashes:
            expected = self.expected_hashes[rid]
            if len(expected) > MAX_EXPECTED_HASHES:  # replica reports no hashes (no prefix cache)
                expected.clear()
            expected.update(hashes)
