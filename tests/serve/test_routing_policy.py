"""Routing choices on hand-built snapshots: prefix affinity, least load, power-of-two fallback."""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID

from workers.engine.block_hash import compute_block_hashes
from workers.router.request_router import PagodaRequestRouter
from workers.router.routing_policy import (
    ReplicaView,
    RoutingPolicy,
    cached_prefix_blocks,
    load_of,
    power_of_two,
    rank_replicas,
)
from workers.tracker.load_tracker import UNKNOWN_VERSION, LoadTracker, ReplicaLoad

POLICY = RoutingPolicy()
PROMPT = list(range(100, 180))  # five full blocks of 16
HASHES = compute_block_hashes(PROMPT, 16)


def test_cached_prefix_counts_only_the_leading_run():
    assert cached_prefix_blocks(HASHES, frozenset(HASHES)) == 5
    assert cached_prefix_blocks(HASHES, frozenset(HASHES[:3])) == 3
    assert cached_prefix_blocks(HASHES, frozenset(HASHES[1:])) == 0
    assert cached_prefix_blocks([], frozenset(HASHES)) == 0


def test_block_hashes_are_chained():
    other = compute_block_hashes([7] + PROMPT[1:], 16)
    assert len(other) == len(HASHES)
    assert not set(other) & set(HASHES)  # a different first token changes every block


def test_load_counts_queue_running_kv_and_unreported_routes():
    view = ReplicaView(num_running=3, num_waiting=2, kv_usage=0.5, routed_since_report=1)
    assert load_of(view, RoutingPolicy(kv_weight=4.0)) == pytest.approx(3 + 2 + 1 + 2.0)


def test_least_loaded_first_without_prefix():
    views = {"a": ReplicaView(num_running=5), "b": ReplicaView(num_running=1),
             "c": ReplicaView(num_waiting=3)}
    assert rank_replicas(["a", "b", "c"], views, [], POLICY) == ["b", "c", "a"]


def test_kv_usage_breaks_equal_queues():
    views = {"a": ReplicaView(num_running=2, kv_usage=0.9),
             "b": ReplicaView(num_running=2, kv_usage=0.1)}
    assert rank_replicas(["a", "b"], views, [], POLICY)[0] == "b"


def test_prefix_owner_wins_over_a_less_loaded_replica():
    views = {"a": ReplicaView(num_running=4, cached_hashes=frozenset(HASHES[:4])),
             "b": ReplicaView(num_running=0),
             "c": ReplicaView(num_running=1, cached_hashes=frozenset(HASHES[:2]))}
    assert rank_replicas(["a", "b", "c"], views, HASHES, POLICY) == ["a", "b", "c"]


def test_overloaded_prefix_owner_is_skipped():
    views = {"a": ReplicaView(num_running=20, cached_hashes=frozenset(HASHES)),
             "b": ReplicaView(num_running=2)}
    policy = RoutingPolicy(overload_margin=8.0)
    assert rank_replicas(["a", "b"], views, HASHES, policy) == ["b", "a"]


def test_short_prefix_below_minimum_is_ignored():
    views = {"a": ReplicaView(num_running=3, cached_hashes=frozenset(HASHES[:1])),
             "b": ReplicaView(num_running=0)}
    policy = RoutingPolicy(min_prefix_blocks=2)
    assert rank_replicas(["a", "b"], views, HASHES, policy)[0] == "b"


def test_unknown_candidates_count_as_idle_and_equal_loads_spread():
    views = {"a": ReplicaView(num_running=1)}
    assert rank_replicas(["a", "new"], views, [], POLICY)[0] == "new"
    firsts = {rank_replicas(["x", "y"], {}, [], POLICY, random.Random(seed))[0]
              for seed in range(20)}
    assert firsts == {"x", "y"}


def test_power_of_two_picks_two_distinct_candidates():
    for seed in range(10):
        picked = power_of_two(["a", "b", "c", "d"], random.Random(seed))
        assert len(picked) == 2 and len(set(picked)) == 2
    assert power_of_two(["only"]) == ["only"]


def test_policy_rejects_bad_values():
    with pytest.raises(ValueError):
        RoutingPolicy(min_prefix_blocks=0)
    with pytest.raises(ValueError):
        RoutingPolicy(snapshot_max_age_s=0)


def test_tracker_upserts_drops_silent_replicas_and_sends_changed_hashes():
    tracker = LoadTracker(drop_after_s=0.2)
    assert tracker.report(ReplicaLoad("a", num_running=1, hash_version=1), [1, 2])
    assert not tracker.report(ReplicaLoad("b", hash_version=3))  # hashes never sent
    snap = tracker.snapshot({"a": 1})
    assert set(snap.loads) == {"a", "b"} and set(snap.block_hashes) == {"b"}
    assert tracker.report(ReplicaLoad("a", hash_version=1))  # unchanged, tracker has them
    assert snap.loads["b"].hash_version == UNKNOWN_VERSION
    tracker.report(ReplicaLoad("b", hash_version=3), [5])  # resent in full, same version
    assert tracker.snapshot({"a": 1, "b": UNKNOWN_VERSION}).block_hashes == {"b": [5]}
    time.sleep(0.3)
    tracker.report(ReplicaLoad("a", hash_version=1))
    assert set(tracker.snapshot().loads) == {"a"}
    tracker.unregister("a")
    assert tracker.snapshot().loads == {}


# The router itself, fed snapshots by hand.

@dataclass
class Replica:
    """Stands in for Serve's RunningReplica: the router only reads replica_id."""

    replica_id: ReplicaID
    max_ongoing_requests: int = 64


def make_router(**kwargs) -> PagodaRequestRouter:
    router = PagodaRequestRouter(deployment_id=DeploymentID(name="ModelReplica", app_name="t"),
                                 handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(**kwargs)
    router.ensure_refresher = lambda: None  # no tracker in these tests
    return router


def replicas(*names: str) -> list[Replica]:
    return [Replica(ReplicaID(unique_id=n, deployment_id=DeploymentID("ModelReplica", "t")))
            for n in names]


def pending(tokens: list[int], request_id: str = "r") -> PendingRequest:
    meta = RequestMetadata(request_id=request_id, internal_request_id=request_id)
    return PendingRequest(args=[tokens, None, "r"], kwargs={}, metadata=meta)


def snapshot(tracker: LoadTracker, loads: dict[str, tuple[int, list[int]]]):
    for rid, (running, hashes) in loads.items():
        tracker.report(ReplicaLoad(rid, num_running=running, hash_version=len(hashes)), hashes)
    return tracker.snapshot()


async def choose(router: PagodaRequestRouter, names: list[str], tokens: list[int]) -> list[str]:
    ranks = await router.choose_replicas(replicas(*names), pending(tokens))
    return [r.replica_id.unique_id for rank in ranks for r in rank]


def routed(router: PagodaRequestRouter, name: str, tokens: list[int]) -> None:
    router.on_request_routed(pending(tokens), replicas(name)[0].replica_id, None)


async def test_router_follows_prefix_then_load_and_counts_its_own_routes():
    router = make_router()
    router.apply(snapshot(LoadTracker(), {"a": (2, HASHES), "b": (0, [])}))
    assert await choose(router, ["a", "b"], PROMPT) == ["a", "b"]
    assert await choose(router, ["a", "b"], [1, 2, 3]) == ["b", "a"]
    for _ in range(3):  # routes the snapshot cannot show yet push b above a
        routed(router, "b", [1, 2, 3])
    assert await choose(router, ["a", "b"], [1, 2, 3]) == ["a", "b"]


async def test_a_burst_of_choices_spreads_before_any_request_is_routed():
    router = make_router()
    router.apply(snapshot(LoadTracker(), {"a": (0, HASHES), "b": (0, [])}))
    firsts = [(await router.choose_replicas(replicas("a", "b"), pending([7, i], f"x{i}")))[0][0]
              for i in range(8)]
    assert sorted(r.replica_id.unique_id for r in firsts) == ["a"] * 4 + ["b"] * 4
    # the prefix owner takes a burst only up to the overload margin, then the idler one
    owners = [(await router.choose_replicas(replicas("a", "b"), pending(PROMPT, f"p{i}")))[0][0]
              for i in range(24)]
    on_a = sum(r.replica_id.unique_id == "a" for r in owners)
    assert 8 < on_a < 24, on_a
    # routing where it was steered moves no count; routing elsewhere moves it
    counts = dict(router.routed_since_report)
    router.on_request_routed(pending([7, 0], "x0"), firsts[0].replica_id, None)
    assert dict(router.routed_since_report) == counts
    other = "b" if firsts[1].replica_id.unique_id == "a" else "a"
    router.on_request_routed(pending([7, 1], "x1"), replicas(other)[0].replica_id, None)
    assert router.routed_since_report[other] == counts[other] + 1
    assert sum(router.routed_since_report.values()) == sum(counts.values())


async def test_router_remembers_prompts_it_routed_until_the_next_report():
    router = make_router()
    tracker = LoadTracker()
    router.apply(snapshot(tracker, {"a": (0, []), "b": (0, [])}))
    routed(router, "b", PROMPT)
    assert (await choose(router, ["a", "b"], PROMPT))[0] == "b"
    tracker.report(ReplicaLoad("b", hash_version=7), [])  # b's cache turned out empty
    router.apply(tracker.snapshot(dict(router.hash_versions)))
    assert router.views["b"].cached_hashes == frozenset()
    assert router.routed_since_report["b"] == 0


async def test_router_falls_back_to_power_of_two_when_snapshot_is_stale():
    router = make_router(snapshot_max_age_s=0.05)
    router.apply(snapshot(LoadTracker(), {"a": (0, HASHES), "b": (9, [])}))
    await asyncio.sleep(0.1)
    chosen = await router.choose_replicas(replicas("a", "b", "c"), pending(PROMPT))
    assert len(chosen) == 1 and len(chosen[0]) == 2  # one rank of two: Serve takes the shorter


async def test_a_resumed_request_shuns_the_replicas_it_was_lost_on():
    router = make_router()
    router.apply(snapshot(LoadTracker(), {"a": (0, HASHES), "b": (5, []), "c": (9, [])}))
    resumed = pending(PROMPT)
    resumed.kwargs["avoid_replicas"] = ["a"]
    ranks = await router.choose_replicas(replicas("a", "b", "c"), resumed)
    assert [r.replica_id.unique_id for rank in ranks for r in rank] == ["b", "c"]
    resumed.kwargs["avoid_replicas"] = ["a", "b", "c"]  # nowhere else to go: any replica
    ranks = await router.choose_replicas(replicas("a", "b", "c"), resumed)
    assert [r.replica_id.unique_id for rank in ranks for r in rank] == ["a", "b", "c"]


def test_the_replica_client_is_an_engine_client():
    from app.engine_client import EngineClient
    from workers.router.replica_client import ReplicaClient

    handle = type("Handle", (), {"options": lambda self, **kw: self})()
    assert isinstance(ReplicaClient(handle, None, None, None, 3), EngineClient)
