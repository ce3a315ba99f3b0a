"""Typed arguments of the Serve application builder (`args:` in deploy/config*.yaml)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.settings import ApiConfig
from workers.engine.config import EngineConfig
from workers.router.routing_policy import RoutingPolicy

MAX_ENGINE_THREADS = 8  # past this, one small model's matmuls gain less than another replica


class CpuPlan(NamedTuple):
    replicas: int
    threads: int  # engine threads per replica


def cpu_plan(cores: int) -> CpuPlan:
    """Replicas and engine threads for a CPU-only machine with `cores` cores.

    From 3 cores up one core stays with the HTTP proxy, the ingress and Ray; an engine thread
    sharing a core with them stalls every step, since each forward waits for its slowest
    thread. The other cores go to replicas of at most MAX_ENGINE_THREADS threads each: 4 cores
    -> 1 replica x 3 threads, 16 -> 2 x 7, 64 -> 8 x 7. With 2 cores, keeping one idle for
    serving costs more than the stalls (measured: 1 x 2 serves 26% more tokens per second at
    concurrency 32 than 1 x 1, bench/vs_llamacpp.py), so the engine takes both.
    """
    engine_cores = cores if cores <= 2 else cores - 1
    replicas = -(-engine_cores // MAX_ENGINE_THREADS)
    return CpuPlan(replicas, engine_cores // replicas)


def machine_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ReplicaArgs(BaseModel):
    """The model-replica deployment: autoscaling, back-pressure and resources."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    # a fixed count instead of autoscaling (min/max/initial are then unused), e.g. for an
    # external scaler (`external_scaler_enabled: true` on the application lets it change it)
    num_replicas: int | None = Field(None, ge=1)
    # continuous batching keeps many requests in flight per replica; scale out past this
    target_ongoing_requests: float = Field(16, gt=0)
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(128, ge=-1)  # -1: unbounded; beyond it callers get 503
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    # a replica split over devices: CPUs of each worker rank's bundle (GPUs as num_gpus), and
    # how its bundles spread; None: STRICT_PACK (one node) without pipeline stages, else PACK
    worker_num_cpus: float = Field(1.0, ge=0)
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] | None = None
    accelerator_type: str | None = None
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0)
    health_check_period_s: float = Field(5.0, gt=0)
    report_interval_s: float = Field(0.25, gt=0)
    # times the ingress resumes one request on another replica after losing its replica
    max_resumes: int = Field(3, ge=0)

    @model_validator(mode="after")
    def check_bounds(self) -> ReplicaArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.initial_replicas is not None and \
                not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie in [min_replicas, max_replicas]")
        if self.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError("target_ongoing_requests must not exceed max_ongoing_requests")
        return self

    def max_choices(self) -> int | None:
        """Engine calls the replicas can hold at once, running or queued; None: unbounded."""
        if self.max_queued_requests < 0:
            return None
        replicas = self.num_replicas or self.max_replicas
        return replicas * self.max_ongoing_requests + self.max_queued_requests

    def deployment_options(self) -> dict[str, Any]:
        actor_options: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor_options["num_gpus"] = self.num_gpus
        if self.accelerator_type:
            actor_options["accelerator_type"] = self.accelerator_type
        autoscaling = {
            "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
        }
        if self.initial_replicas is not None:
            autoscaling["initial_replicas"] = self.initial_replicas
        scaling: dict[str, Any] = {"num_replicas": self.num_replicas} \
            if self.num_replicas is not None else {"autoscaling_config": autoscaling}
        return {
            **scaling,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": actor_options,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "health_check_period_s": self.health_check_period_s,
        }


class IngressArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(512, ge=1)

    def deployment_options(self) -> dict[str, Any]:
        return {"num_replicas": self.num_replicas, "max_ongoing_requests":
                self.max_ongoing_requests, "ray_actor_options": {"num_cpus": self.num_cpus}}


class PagodaArgs(BaseModel):
    """The top-level `model` and `served_model_name` belong to the engine section. `auto` in
    engine.num_threads or replicas.max_replicas (CPU only) takes the value of `cpu_plan` for
    the machine that validates the config (`serve run`'s)."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = EngineConfig()
    replicas: ReplicaArgs = ReplicaArgs()
    ingress: IngressArgs = IngressArgs()
    routing: RoutingPolicy = RoutingPolicy()
    api: ApiConfig = ApiConfig()

    @model_validator(mode="before")
    @classmethod
    def resolve_auto(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        engine, replicas = dict(data.get("engine") or {}), dict(data.get("replicas") or {})
        for key in ("model", "served_model_name"):
            if key in data:
                engine[key] = data.pop(key)
        data["engine"] = engine
        autos = [(part, key) for part, key in ((engine, "num_threads"), (replicas, "max_replicas"))
                 if part.get(key) == "auto"]
        if not autos:
            return data
        if replicas.get("num_gpus") or engine.get("device", "cpu") not in ("cpu", "auto"):
            raise ValueError("'auto' threads and replicas are for CPU-only configs")
        plan = cpu_plan(machine_cores())
        for part, key in autos:
            part[key] = plan.threads if key == "num_threads" else plan.replicas
        return {**data, "engine": engine, "replicas": replicas}

    def replica_options(self) -> dict[str, Any]:
        """Serve deployment options of the model replica; one bundle per rank when it spans
        several devices (bundle 0 is the replica actor itself, rank 0)."""
        options = self.replicas.deployment_options()
        tp, pp = self.engine.tensor_parallel_size, self.engine.pipeline_parallel_size
        if tp * pp == 1:
            return options
        r = self.replicas
        first = {"CPU": r.num_cpus, **({"GPU": r.num_gpus} if r.num_gpus else {})}
        worker = {"CPU": r.worker_num_cpus, **({"GPU": r.num_gpus} if r.num_gpus else {})}
        options["placement_group_bundles"] = [first] + [worker] * (tp * pp - 1)
        options["placement_group_strategy"] = r.placement_strategy or (
            "STRICT_PACK" if pp == 1 else "PACK")
        return options

    def router_kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self.routing)
