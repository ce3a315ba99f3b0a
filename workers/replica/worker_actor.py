"""The worker ranks of a model replica split over devices, as Ray actors.

Serve reserves the replica's devices as a placement group (`placement_group_bundles`): bundle 0
holds the replica actor itself, which is rank 0 (driver and first device), and bundle r holds
the actor of worker rank r with that bundle's resources. The replica owns these actors, so they
die with it; when one dies first the replica reports unhealthy and Serve replaces the group.
"""
from __future__ import annotations

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from workers.engine.config import EngineConfig
from workers.engine.worker import run_worker, tcp_init_method

STOP_TIMEOUT_S = 10.0


def worker_actor_name(replica_id: str, rank: int) -> str:
    return f"PAGODA_WORKER::{replica_id}::{rank}"


@ray.remote
class ModelWorker:
    """One device's shard of the model and KV cache; loops on the driver's step plans."""

    def run(self, config: EngineConfig, rank: int, init_method: str) -> None:
        run_worker(config, rank, init_method)


class RayWorkers:
    """Ranks 1..world-1 of a replica, one actor per bundle of its placement group."""

    def __init__(self, config: EngineConfig, replica_id: str) -> None:
        self.init_method = tcp_init_method(ray.util.get_node_ip_address())
        group = get_current_placement_group()
        if group is not None and len(group.bundle_specs) < config.world_size:
            raise ValueError(f"the replica's placement group has {len(group.bundle_specs)} "
                             f"bundles for {config.world_size} ranks")
        self.actors = []
        for rank in range(1, config.world_size):
            options = {"name": worker_actor_name(replica_id, rank), "namespace": "serve",
                       "num_cpus": 0}
            if group is not None:
                bundle = group.bundle_specs[rank]
                options.update(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                               scheduling_strategy=PlacementGroupSchedulingStrategy(
                                   group, placement_group_bundle_index=rank))
            # mypy does not see what a class decorator returns: here Ray's ActorClass
            self.actors.append(ModelWorker.options(**options).remote())  # type: ignore[attr-defined]
        self.loops = [actor.run.remote(config, rank, self.init_method)
                      for rank, actor in enumerate(self.actors, start=1)]

    def alive(self) -> bool:
        """A worker's loop only returns after the driver stops it, or when it dies."""
        done, _ = ray.wait(self.loops, num_returns=len(self.loops), timeout=0)
        return not done

    def stop(self) -> None:
        ray.wait(self.loops, num_returns=len(self.loops), timeout=STOP_TIMEOUT_S)
        for actor in self.actors:
            ray.kill(actor)
