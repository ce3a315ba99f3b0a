"""A forced downscale of a busy replica: Serve stops routing to it and drains it, and the
streams still running when its grace period ends carry on on the surviving replica."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from .service import NUM_REPLICAS
from .streams import chat_body, check_completed_chat
from .test_faults import content_of, serves_normally, stream_all, wait_running_on

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DOWNSCALE_AFTER_S = 3.0
SCALE_TIMEOUT_S = 240


def spread_bodies(count: int, max_tokens: int) -> list[dict]:
    """Greedy streams whose prompts differ from the first token (their own system message),
    so prefix affinity does not gather them on one replica: both replicas get streams."""
    return [{**chat_body("List the planets one by one.", max_tokens, temperature=0,
                         ignore_eos=True, stream_options={"include_usage": True}),
             "messages": [{"role": "system", "content": f"{i}: you are stream {i}."},
                          {"role": "user", "content": "List the planets one by one."}]}
            for i in range(count)]


def scale_model_replicas(count: int) -> None:
    """Sets ModelReplica's replica count through the Serve controller, as an external scaler
    does (the application runs with `external_scaler_enabled`)."""
    import ray
    from ray.serve._private.common import DeploymentID
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    ray.get(controller.update_deployment_replicas.remote(
        DeploymentID(name="ModelReplica", app_name="pagoda"), count), timeout=30)


def wait_replica_count(service, count: int) -> list[str]:
    deadline = time.monotonic() + SCALE_TIMEOUT_S
    ids = service.replica_ids()
    while time.monotonic() < deadline and len(ids) != count:
        time.sleep(0.5)
        ids = service.replica_ids()
    assert len(ids) == count, ids
    return ids


@pytest.mark.kills_replica  # the downscale stops a replica on purpose
def test_forced_downscale_of_a_busy_replica_loses_no_stream(service):
    # 160 tokens per stream outlast the 5 s grace period: the drain must hand streams over
    bodies = spread_bodies(16, 160)
    expected = asyncio.run(stream_all(service.base_url, bodies))
    before = service.replica_ids()
    during: list[httpx.Response] = []
    on_stopped: list[int] = []

    async def downscale(http: httpx.AsyncClient) -> None:
        await asyncio.to_thread(wait_running_on, service, NUM_REPLICAS)
        await asyncio.sleep(DOWNSCALE_AFTER_S)  # mid-stream: every stream has tokens out
        loads = (await asyncio.to_thread(service.snapshot)).loads
        await asyncio.to_thread(scale_model_replicas, NUM_REPLICAS - 1)
        # requests that arrive while the replica drains are served, by the other one
        during.extend(await asyncio.gather(*(
            http.post("/v1/chat/completions", json={
                "model": "smollm2-135m-instruct", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": f"Count to {i}."}]})
            for i in range(4))))
        survivors = await asyncio.to_thread(wait_replica_count, service, NUM_REPLICAS - 1)
        on_stopped.extend(loads[rid].num_running for rid in before if rid not in survivors)

    started = time.monotonic()
    results = asyncio.run(stream_all(service.base_url, bodies, downscale))
    elapsed = time.monotonic() - started
    for answer in during:
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["finish_reason"] in ("stop", "length")
    for result, quiet in zip(results, expected, strict=True):
        check_completed_chat(result, 160, ignore_eos=True)
        assert content_of(result) == content_of(quiet)  # greedy: no token lost or repeated
        usage, quiet_usage = result.events[-2]["usage"], quiet.events[-2]["usage"]
        for key in ("prompt_tokens", "completion_tokens"):
            assert usage[key] == quiet_usage[key]
    assert on_stopped and on_stopped[0] > 0, "the stopped replica ran no stream"
    gaps = sorted(r.longest_gap_s for r in results)
    quiet_gaps = sorted(r.longest_gap_s for r in expected)
    print(f"\nforced downscale under {len(bodies)} streams: {on_stopped[0]} ran on the stopped "
          f"replica; all completed with the uninterrupted run's text in {elapsed:.1f} s, "
          f"longest stall per stream max {gaps[-1]:.2f} s, median {gaps[len(gaps) // 2]:.2f} s "
          f"(without the downscale: max {quiet_gaps[-1]:.2f} s); "
          f"{len(during)} requests sent during the drain all answered 200")
    serves_normally(service.base_url)
    scale_model_replicas(NUM_REPLICAS)  # back to two for the tests after this one
    wait_replica_count(service, NUM_REPLICAS)
    serves_normally(service.base_url)
