"""Which replica should serve a prompt: prefix affinity, then least loaded.

Pure functions over a load snapshot, so the policy is tested without Ray. The request router
feeds them the LoadTracker's last snapshot plus the requests it routed since then.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

ROUTING_MODES = ("prefix_affinity", "least_loaded", "power_of_two")


@dataclass(frozen=True)
class RoutingPolicy:
    # prefix_affinity: longest cached prefix, then least loaded; least_loaded: ignore prefixes;
    # power_of_two: Serve's default (two random replicas, the shorter queue wins)
    mode: str = "prefix_affinity"
    kv_weight: float = 4.0  # a full KV cache weighs like this many queued requests
    overload_margin: float = 8.0  # prefix owner skipped when this much busier than the idlest
    min_prefix_blocks: int = 1  # shorter cached prefixes are not worth a detour
    snapshot_max_age_s: float = 2.0  # older snapshots mean the tracker is gone: power of two
    refresh_interval_s: float = 0.2

    def __post_init__(self) -> None:
        if self.mode not in ROUTING_MODES:
            raise ValueError(f"routing mode must be one of {ROUTING_MODES}, got {self.mode!r}")
        if self.kv_weight < 0 or self.overload_margin < 0:
            raise ValueError("kv_weight and overload_margin must be non-negative")
        if self.min_prefix_blocks < 1:
            raise ValueError("min_prefix_blocks must be at least 1")
        if self.snapshot_max_age_s <= 0 or self.refresh_interval_s <= 0:
            raise ValueError("snapshot_max_age_s and refresh_interval_s must be positive")


@dataclass
class ReplicaView:
    """What the router believes about one replica right now."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    routed_since_report: int = 0  # requests this router sent that the last report cannot show
    cached_hashes: frozenset[int] = frozenset()


def load_of(view: ReplicaView, policy: RoutingPolicy) -> float:
    return view.num_running + view.num_waiting + view.routed_since_report \
        + policy.kv_weight * view.kv_usage


def cached_prefix_blocks(prompt_hashes: list[int], cached: frozenset[int] | set[int]) -> int:
    """Length of the leading run of prompt blocks the replica holds (hashes are chained)."""
    n = 0
    for h in prompt_hashes:
        if h not in cached:
            break
        n += 1
    return n


def rank_replicas(candidates: list[str], views: dict[str, ReplicaView],
                  prompt_hashes: list[int], policy: RoutingPolicy,
                  rng: random.Random | None = None) -> list[str]:
    """Candidates best first: the longest cached prefix unless overloaded, then by load.

    Candidates the snapshot does not know yet (just started) count as idle.
    """
    if not candidates:
        return []
    shuffled = list(candidates)
    (rng or random).shuffle(shuffled)  # equal loads spread instead of always picking one replica
    views = {c: views.get(c, ReplicaView()) for c in shuffled}
    loads = {c: load_of(views[c], policy) for c in shuffled}
    by_load = sorted(shuffled, key=loads.__getitem__)
    if prompt_hashes and policy.mode == "prefix_affinity":
        matches = {c: cached_prefix_blocks(prompt_hashes, views[c].cached_hashes)
                   for c in shuffled}
        owner = max(by_load, key=matches.__getitem__)  # ties go to the less loaded
        if matches[owner] >= policy.min_prefix_blocks \
                and loads[owner] - loads[by_load[0]] <= policy.overload_margin:
            return [owner] + [c for c in by_load if c != owner]
    return by_load


def power_of_two(candidates: list[str], rng: random.Random | None = None) -> list[str]:
    """Two random candidates; Serve sends to the one with the shorter queue."""
    return (rng or random).sample(candidates, min(2, len(candidates)))
