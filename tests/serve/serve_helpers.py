"""Helpers shared by the Serve end-to-end tests."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx


def skip_to_first_content(lines: Iterator[str]) -> None:
    """Consume SSE lines up to the first chunk that carries content: generation has begun."""
    for line in lines:
        if line.startswith("data: {") and '"content"' in line:
            return
    raise AssertionError("the stream ended before any content")


def running_replicas(deployment: str = "ModelReplica") -> int:
    """Asks this cluster's Serve controller; `serve.status()` would reuse a client cached for
    an earlier module's cluster."""
    import ray
    from ray.serve.schema import ServeInstanceDetails

    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    details = ServeInstanceDetails(**ray.get(controller.get_serve_instance_details.remote()))
    replicas = details.applications["pagoda"].deployments[deployment].replicas
    return sum(replica.state == "RUNNING" for replica in replicas)


def worker_actor(replica_id: str, rank: int):
    """The worker actor of one rank of a replica split over devices."""
    import ray

    from workers.replica.worker_actor import worker_actor_name

    return ray.get_actor(worker_actor_name(replica_id, rank), namespace="serve")


def disconnect_frees_kv(serve_app, model: str) -> None:
    """A client that goes away mid-stream frees its KV blocks on every rank. Workers keep no
    request state: the driver's block tables place every rank's KV, so its free list is the
    KV of all ranks."""
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 1500, "ignore_eos": True, "stream": True}
    url = f"{serve_app.base_url}/v1/chat/completions"
    with httpx.Client(timeout=60) as http, http.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        skip_to_first_content(r.iter_lines())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(0.6)  # two load report intervals
        (load,) = serve_app.snapshot().loads.values()
        if load.num_running == 0 and load.kv_usage == 0:
            break
    assert (load.num_running, load.kv_usage) == (0, 0)


def read_stream(url: str, body: dict, started: threading.Event, events: list[str]) -> None:
    with httpx.Client(timeout=120) as http, http.stream("POST", url, json=body) as r:
        lines = r.iter_lines()
        skip_to_first_content(lines)
        started.set()
        events.extend(line for line in lines if line.startswith("data: "))


def killing_a_rank_ends_streams(serve_app, model: str, rank: int) -> str:
    """Kill one worker rank under load: every stream ends (an error event, or the whole answer
    when it resumed on the new replica, then [DONE]) and Serve replaces the whole group;
    returns the new replica's id."""
    import ray
    from ray.exceptions import RayError

    (victim,) = serve_app.wait_for_replicas(1)
    url = f"{serve_app.base_url}/v1/chat/completions"
    streams: list[list[str]] = [[] for _ in range(3)]
    starts = [threading.Event() for _ in streams]
    threads = [threading.Thread(target=read_stream, args=(url, {
        "model": model, "messages": [{"role": "user", "content": f"Count to {i} thousand."}],
        "max_tokens": 300, "ignore_eos": True, "stream": True}, started, events))
        for i, (started, events) in enumerate(zip(starts, streams, strict=True))]
    for t in threads:
        t.start()
    assert all(s.wait(120) for s in starts)
    ray.kill(worker_actor(victim, rank), no_restart=True)
    for t in threads:
        t.join(600)  # every stream ends instead of hanging
    assert not any(t.is_alive() for t in threads)
    for events in streams:
        assert events[-1] == "data: [DONE]"
        payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
        assert any("error" in p or any(c.get("finish_reason") for c in p.get("choices", []))
                   for p in payloads)
    deadline = time.monotonic() + 300
    ids: list[str] = []
    while time.monotonic() < deadline:  # Serve replaces the unhealthy replica and its workers
        try:
            ids = serve_app.replica_ids()
        except RayError:  # the load tracker may be restarting along with its owner
            ids = []
        if len(ids) == 1 and victim not in ids:
            break
        time.sleep(1)
    assert len(ids) == 1 and victim not in ids, ids
    worker_actor(ids[0], rank)  # the new group has its own workers
    return ids[0]
