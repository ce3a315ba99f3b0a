"""The routing-policy switch: prefix affinity, least loaded, or Serve's power of two."""
from __future__ import annotations

import pytest

from app.serve_args import PagodaArgs
from workers.engine.block_hash import compute_block_hashes
from workers.router.routing_policy import ReplicaView, RoutingPolicy, rank_replicas

HASHES = compute_block_hashes(list(range(100, 164)), 16)
VIEWS = {"owner": ReplicaView(num_running=3, cached_hashes=frozenset(HASHES)),
         "idle": ReplicaView(num_running=0)}


def test_prefix_affinity_prefers_the_replica_holding_the_prefix():
    assert rank_replicas(["owner", "idle"], VIEWS, HASHES, RoutingPolicy())[0] == "owner"


def test_least_loaded_ignores_cached_prefixes():
    policy = RoutingPolicy(mode="least_loaded")
    assert rank_replicas(["owner", "idle"], VIEWS, HASHES, policy) == ["idle", "owner"]


def test_unknown_mode_is_rejected_in_the_app_args():
    assert PagodaArgs.model_validate({"routing": {"mode": "power_of_two"}}).routing.mode \
        == "power_of_two"
    with pytest.raises(ValueError, match="routing mode"):
        PagodaArgs.model_validate({"routing": {"mode": "round_robin"}})
