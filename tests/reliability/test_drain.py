"""A forced downscale of a busy replica: the replica Serve stops takes no new requests, the
streams it can finish within its graceful shutdown period finish there, and the rest resume on
the survivor when Serve ends the replica. Every stream completes with the text of a quiet run."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from .service import NUM_REPLICAS, reliability_config
from .streams import chat_body, check_completed_chat
from .test_faults import content_of, serves_normally, stream_all, wait_running_on

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SHORT, LONG = 6, 300  # tokens: within the 5 s graceful period, and well beyond it


def replica_states() -> dict[str, str]:
    """ModelReplica replicas by id with their Serve state (STARTING, RUNNING, STOPPING...)."""
    import ray
    from ray.serve.schema import ServeInstanceDetails

    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    details = ServeInstanceDetails(**ray.get(controller.get_serve_instance_details.remote()))
    replicas = details.applications["pagoda"].deployments["ModelReplica"].replicas
    return {r.replica_id: str(getattr(r.state, "value", r.state)) for r in replicas}


def deploy(service, num_replicas: int | None) -> None:
    """Applies the suite's config, pinning the model replicas to num_replicas (None: as the
    app's args say). Only ModelReplica's autoscaling changes: no replica restarts."""
    import ray
    from ray.serve.schema import ServeDeploySchema

    config = reliability_config()
    host, port = service.base_url.removeprefix("http://").split(":")
    config["http_options"] = {**config.get("http_options", {}), "host": host, "port": int(port)}
    if num_replicas is not None:
        target = config["applications"][0]["args"]["replicas"]["target_ongoing_requests"]
        config["applications"][0]["deployments"] = [{"name": "ModelReplica", "autoscaling_config": {
            "min_replicas": num_replicas, "max_replicas": num_replicas,
            "initial_replicas": num_replicas, "target_ongoing_requests": target}}]
    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    ray.get(controller.apply_config.remote(ServeDeploySchema(**config)))


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@pytest.mark.kills_replica
def test_downscaling_a_busy_replica_loses_no_stream(service):
    bodies = [chat_body(f"Stream {i}: describe the seasons one by one.",
                        SHORT if i % 2 else LONG, temperature=0, ignore_eos=True,
                        stream_options={"include_usage": True}) for i in range(16)]
    expected = asyncio.run(stream_all(service.base_url, bodies))
    stopping: list[str] = []
    figures: dict[str, int] = {}

    async def downscale(http: httpx.AsyncClient) -> None:
        await asyncio.to_thread(wait_running_on, service, NUM_REPLICAS)
        await asyncio.to_thread(deploy, service, 1)
        stopping.extend(await asyncio.to_thread(wait_for, lambda: [
            rid for rid, state in replica_states().items() if state == "STOPPING"],
            60, "a replica stopping"))
        load = (await asyncio.to_thread(service.snapshot)).loads[stopping[0]]
        figures.update(running=load.num_running, requests=load.num_requests)
        # requests sent while it drains all go to the survivor
        late = [chat_body(f"Late {i}: name a colour.", 4, temperature=0, ignore_eos=True,
                          stream_options={"include_usage": True}) for i in range(4)]
        for result in await stream_all(service.base_url, late):
            check_completed_chat(result, 4, ignore_eos=True)
        snapshot = await asyncio.to_thread(service.snapshot)
        if stopping[0] in snapshot.loads:  # still reporting: it took none of them
            assert snapshot.loads[stopping[0]].num_requests == figures["requests"]

    started = time.monotonic()
    results = asyncio.run(stream_all(service.base_url, bodies, downscale))
    elapsed = time.monotonic() - started
    for body, result, quiet in zip(bodies, results, expected, strict=True):
        check_completed_chat(result, body["max_tokens"], ignore_eos=True)
        assert content_of(result) == content_of(quiet)
    gaps = sorted(r.longest_gap_s for r in results)
    print(f"\ndownscale of a busy replica: {figures['running']} streams running on it, all "
          f"{len(results)} streams completed with the quiet run's text in {elapsed:.1f} s; "
          f"longest stall per stream: max {gaps[-1]:.2f} s; 4 requests sent during the drain "
          "all went to the survivor")
    wait_for(lambda: stopping[0] not in replica_states(), 60, "the stopped replica gone")
    serves_normally(service.base_url)
    deploy(service, None)  # back to the suite's two replicas
    wait_for(lambda: len(service.replica_ids()) == NUM_REPLICAS and
             stopping[0] not in service.replica_ids(), 240, "a second replica again")
