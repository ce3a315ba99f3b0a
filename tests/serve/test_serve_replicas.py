"""Two model replicas behind the ingress: spreading, prefix affinity, back-pressure, failures.

Runs deploy/config.yaml with the replica count pinned to two and small per-replica limits, so
a burst of requests overflows the queue on two CPU cores.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import yaml
from serve_helpers import skip_to_first_content

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SERVED = "smollm2-135m-instruct"
MAX_ONGOING = 4
MAX_QUEUED = 8  # Serve counts requests still being routed, so bursts need headroom


def serve_config() -> dict:
    config = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())
    args = config["applications"][0]["args"]
    args["engine"]["num_threads"] = 1  # two replicas share the two cores
    args["replicas"].update(min_replicas=2, max_replicas=2, initial_replicas=2,
                            target_ongoing_requests=2, max_ongoing_requests=MAX_ONGOING,
                            max_queued_requests=MAX_QUEUED)
    return config


def chat(content: str, max_tokens: int = 4, **extra) -> dict:
    return {"model": SERVED, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, **extra}


async def post_all(base_url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:
        return await asyncio.gather(*(http.post("/v1/chat/completions", json=b)
                                      for b in bodies))


def requests_per_replica(serve_app) -> dict[str, int]:
    time.sleep(0.6)  # two report intervals
    return {rid: load.num_requests for rid, load in serve_app.snapshot().loads.items()}


def test_two_replicas_register_with_the_tracker(serve_app):
    ids = serve_app.wait_for_replicas(2)
    snap = serve_app.snapshot()
    assert all(snap.loads[rid].block_size == 16 for rid in ids)


def test_concurrent_load_spreads_over_both_replicas(serve_app):
    serve_app.wait_for_replicas(2)
    before = requests_per_replica(serve_app)
    bodies = [chat(f"Write a word about the number {i}.", max_tokens=16) for i in range(8)]
    responses = asyncio.run(post_all(serve_app.base_url, bodies))
    assert [r.status_code for r in responses] == [200] * 8
    after = requests_per_replica(serve_app)
    served = {rid: after[rid] - before.get(rid, 0) for rid in after}
    assert sum(served.values()) == 8
    assert all(n >= 2 for n in served.values()), served


def test_repeated_conversation_lands_on_the_replica_holding_its_prefix(serve_app):
    serve_app.wait_for_replicas(2)
    system = ("You are a meticulous librarian who catalogues rare maps. " * 12).strip()
    body = {"model": SERVED, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": "Which map is the oldest?"}]}
    before = requests_per_replica(serve_app)
    assert httpx.post(f"{serve_app.base_url}/v1/chat/completions", json=body,
                      timeout=120).status_code == 200
    first = requests_per_replica(serve_app)
    owner = next(rid for rid in first if first[rid] > before.get(rid, 0))
    hits_before = serve_app.snapshot().loads[owner].prefix_cache_hits
    for _ in range(6):  # random or least-loaded routing would split these between replicas
        assert httpx.post(f"{serve_app.base_url}/v1/chat/completions", json=body,
                          timeout=120).status_code == 200
    after = requests_per_replica(serve_app)
    served = {rid: after[rid] - first[rid] for rid in after}
    assert served[owner] == 6, served
    assert serve_app.snapshot().loads[owner].prefix_cache_hits > hits_before


def test_queue_overflow_answers_503_with_retry_after(serve_app):
    serve_app.wait_for_replicas(2)
    burst = 2 * MAX_ONGOING + MAX_QUEUED + 8
    bodies = [chat(f"Tell a long story number {i}.", max_tokens=48, ignore_eos=True)
              for i in range(burst)]
    responses = asyncio.run(post_all(serve_app.base_url, bodies))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429, 503}, codes
    rejected = [r for r in responses if r.status_code != 200]
    assert rejected and codes.count(200) >= 2 * MAX_ONGOING, codes
    error = rejected[0].json()["error"]
    assert error["type"] == "server_error" and error["message"]
    assert "retry-after" in {k.lower() for k in rejected[0].headers}


def test_killing_the_tracker_falls_back_and_serves(serve_app):
    import ray

    from workers.tracker.load_tracker import find_tracker

    serve_app.wait_for_replicas(2)
    ray.kill(find_tracker(), no_restart=True)
    # keep asking while routers see a stale snapshot and the replicas recreate the tracker
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        bodies = [chat(f"Say hello number {i}.", max_tokens=2) for i in range(2)]
        assert [r.status_code for r in asyncio.run(post_all(serve_app.base_url, bodies))] \
            == [200, 200]
    assert len(serve_app.wait_for_replicas(2, timeout_s=30)) == 2


def test_killing_a_replica_mid_stream_resumes_the_stream_and_service_recovers(serve_app):
    import ray

    serve_app.wait_for_replicas(2)
    body = chat("Count slowly to one thousand.", max_tokens=160, ignore_eos=True, stream=True)
    events: list[str] = []
    url = f"{serve_app.base_url}/v1/chat/completions"
    with httpx.Client(timeout=120) as http, http.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        skip_to_first_content(lines)
        victim = busy_replica(serve_app)
        ray.kill(serve_app.replica_actor(victim), no_restart=True)
        events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert not any("error" in c for c in chunks)  # resumed on the survivor, not ended
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # Serve starts a replacement; the tracker drops the dead
        ids = serve_app.replica_ids()
        if len(ids) == 2 and victim not in ids:
            break
        time.sleep(1)
    assert len(ids) == 2 and victim not in ids, ids
    bodies = [chat(f"Say goodbye number {i}.") for i in range(4)]
    assert [r.status_code for r in asyncio.run(post_all(serve_app.base_url, bodies))] == [200] * 4


def busy_replica(serve_app) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for rid, load in serve_app.snapshot().loads.items():
            if load.num_running:
                return rid
        time.sleep(0.1)
    raise AssertionError("no replica reports the streaming request")
