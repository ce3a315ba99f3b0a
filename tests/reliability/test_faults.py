"""Faults under load: a request that raises inside the engine, the LoadTracker killed, a model
replica killed. Streams are running each time; every one must end (none hang), and the service
must serve normally afterwards. A killed replica's streams resume on the survivor and complete."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.api.api_helpers import check_chat_stream

from .service import FAULT_MARKER, NUM_REPLICAS
from .streams import (
    StreamResult,
    chat_body,
    check_completed_chat,
    check_error,
    read_stream,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STREAM_TIMEOUT_S = 240  # no stream may take longer to end, whatever happens to its replica
REPLACEMENT_TIMEOUT_S = 240
KILL_AFTER_S = 3.0


async def stream_all(base_url: str, bodies: list[dict], during=None) -> list[StreamResult]:
    """Runs every streaming body at once; `during(http)` runs while they stream."""
    limits = httpx.Limits(max_connections=len(bodies) + 16)
    async with httpx.AsyncClient(base_url=base_url, timeout=STREAM_TIMEOUT_S,
                                 limits=limits) as http:
        streams = asyncio.gather(*(read_stream(http, b, STREAM_TIMEOUT_S) for b in bodies))
        if during is not None:
            await during(http)
        return await streams


def long_bodies(count: int, max_tokens: int) -> list[dict]:
    return [chat_body(f"Stream {i}: list the planets one by one.", max_tokens, temperature=0,
                      ignore_eos=True, stream_options={"include_usage": True})
            for i in range(count)]


def wait_running_on(service, count: int, timeout_s: float = 60) -> dict:
    """Loads once `count` replicas each run a request."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        loads = service.snapshot().loads
        if sum(1 for load in loads.values() if load.num_running) >= count:
            return loads
        time.sleep(0.2)
    raise AssertionError(f"the load did not reach {count} replicas: {loads}")


def wait_all_running(service, count: int, timeout_s: float = 60) -> dict:
    """Loads once `count` requests run on the replicas together, or at the timeout."""
    deadline = time.monotonic() + timeout_s
    loads = service.snapshot().loads
    while time.monotonic() < deadline and \
            sum(load.num_running for load in loads.values()) < count:
        time.sleep(0.2)
        loads = service.snapshot().loads
    return loads


def serves_normally(base_url: str, count: int = 8) -> None:
    results = asyncio.run(stream_all(base_url, long_bodies(count, 8)))
    for result in results:
        check_completed_chat(result, 8, ignore_eos=True)


def test_request_raising_inside_the_engine_fails_in_openai_shape(service):
    """The marked request makes an engine step raise; the replica survives (not restarted)."""
    faulty = {"model": "smollm2-135m-instruct", "max_tokens": 8,
              "messages": [{"role": "user", "content": f"Please {FAULT_MARKER} now."}]}
    answers: list[httpx.Response] = []

    async def send_faults(http: httpx.AsyncClient) -> None:
        await asyncio.to_thread(wait_running_on, service, NUM_REPLICAS)
        for stream in (False, True, False):
            answers.append(await http.post("/v1/chat/completions",
                                           json={**faulty, "stream": stream}))

    results = asyncio.run(stream_all(service.base_url, long_bodies(16, 48), send_faults))
    for answer in answers:  # the step fails before the first token: an HTTP error
        assert answer.status_code == 500, answer.text
        assert check_error(answer.json()["error"])["type"] == "server_error"
    # the engine isolates the faulty request: every stream batched beside it completes
    print(f"\nengine fault: {len(answers)} faulty requests answered "
          f"{sorted({a.status_code for a in answers})}; {len(results)} streams beside them "
          "all completed")
    for result in results:
        check_completed_chat(result, 48, ignore_eos=True)
    serves_normally(service.base_url)


def test_killing_the_tracker_under_load_loses_no_request(service):
    import ray

    from workers.tracker.load_tracker import find_tracker

    async def kill_tracker(http: httpx.AsyncClient) -> None:
        await asyncio.to_thread(wait_running_on, service, 1)
        ray.kill(find_tracker(), no_restart=True)

    results = asyncio.run(stream_all(service.base_url, long_bodies(24, 40), kill_tracker))
    for result in results:  # routing falls back to power of two: nothing fails
        check_completed_chat(result, 40, ignore_eos=True)
    # replicas create a new tracker and report again; `settled` waits for both
    print(f"\ntracker kill: {len(results)} streams, all completed")


def content_of(result: StreamResult) -> str:
    choices, _ = check_chat_stream(result.events, n=1, include_usage=True)
    return choices[0].content


def wait_replaced(service, victim: str) -> None:
    """Serve replaces a lost replica and the new one registers with the tracker."""
    deadline = time.monotonic() + REPLACEMENT_TIMEOUT_S
    ids = service.replica_ids()
    while time.monotonic() < deadline and (len(ids) != NUM_REPLICAS or victim in ids):
        time.sleep(1)
        ids = service.replica_ids()
    assert len(ids) == NUM_REPLICAS and victim not in ids, ids


@pytest.mark.kills_replica
@pytest.mark.parametrize("count, max_tokens", [(16, 160), (64, 64)])
def test_killing_a_replica_under_load_loses_no_stream(service, count, max_tokens):
    """Streams on the killed replica resume on the survivor from the tokens already sent:
    every stream completes with exactly the text of an uninterrupted run."""
    import ray

    bodies = long_bodies(count, max_tokens)
    expected = asyncio.run(stream_all(service.base_url, bodies))
    victim: list[str] = []
    resumed: list[int] = []

    async def kill_busiest(http: httpx.AsyncClient) -> None:
        # prefix-affinity routing may put every stream on one replica: kill the busiest anyway
        loads = await asyncio.to_thread(wait_all_running, service, count * 3 // 4)
        await asyncio.sleep(KILL_AFTER_S)  # mid-stream: every stream has tokens out by now
        victim.append(max(loads, key=lambda rid: loads[rid].num_running))
        resumed.append(loads[victim[0]].num_running)
        ray.kill(service.replica_actor(victim[0]), no_restart=True)

    started = time.monotonic()
    results = asyncio.run(stream_all(service.base_url, bodies, kill_busiest))
    elapsed = time.monotonic() - started
    for result, quiet in zip(results, expected, strict=True):
        check_completed_chat(result, max_tokens, ignore_eos=True)
        assert content_of(result) == content_of(quiet)  # greedy: no token lost or repeated
        usage, quiet_usage = result.events[-2]["usage"], quiet.events[-2]["usage"]
        for key in ("prompt_tokens", "completion_tokens"):  # the prefix cache is warm now
            assert usage[key] == quiet_usage[key]
    gaps = sorted(r.longest_gap_s for r in results)
    quiet_gaps = sorted(r.longest_gap_s for r in expected)
    print(f"\nreplica kill under {count} streams: {resumed[0]} running on the killed replica, "
          f"all {len(results)} completed with the uninterrupted run's text in {elapsed:.1f} s; "
          f"longest stall per stream: max {gaps[-1]:.2f} s, median {gaps[len(gaps) // 2]:.2f} s "
          f"(without the kill: max {quiet_gaps[-1]:.2f} s)")
    serves_normally(service.base_url)  # the surviving replica serves while Serve replaces
    wait_replaced(service, victim[0])
    serves_normally(service.base_url)
