"""A model replica split over three ranks (deploy/config.cpu-tp3.yaml: TP=3, gloo) on Serve.

The replica actor is rank 0 and two worker actors hold the other shards, in the replica's
placement group. It answers the OpenAI API like a single-device replica; a client that goes
away frees its KV blocks; killing a worker rank under load ends every stream (resumed, or an
error event and [DONE]) and Serve replaces the whole group.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from serve_helpers import skip_to_first_content

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SERVED = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
TP = 3


def serve_config() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "config.cpu-tp3.yaml").read_text())


def worker_actor(replica_id: str, rank: int):
    import ray

    from workers.replica.worker_actor import worker_actor_name

    return ray.get_actor(worker_actor_name(replica_id, rank), namespace="serve")


def replica_load(serve_app):
    time.sleep(0.6)  # two report intervals
    (load,) = serve_app.snapshot().loads.values()
    return load


def test_replica_spans_a_placement_group_of_three_bundles(serve_app):
    from ray.util.placement_group import placement_group_table

    (replica_id,) = serve_app.wait_for_replicas(1)
    workers = [worker_actor(replica_id, rank) for rank in range(1, TP)]
    assert len(workers) == TP - 1
    groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"
              and len(g["bundles"]) == TP]
    assert len(groups) == 1 and groups[0]["strategy"] == "STRICT_PACK"
    bundles = groups[0]["bundles"]
    assert [bundles[i].get("CPU") for i in range(TP)] == [0.5, 0.25, 0.25]  # deploy config


def test_openai_api_end_to_end_streams_and_n(serve_app):
    client = serve_app.openai()
    full = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=12,
                                          temperature=0)
    text = full.choices[0].message.content
    assert text and full.usage.completion_tokens <= 12
    chunks = list(client.chat.completions.create(
        model=SERVED, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens \
        == full.usage.completion_tokens
    several = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=8,
                                             temperature=0, n=3)
    assert sorted(c.index for c in several.choices) == [0, 1, 2]
    assert len({c.message.content for c in several.choices}) == 1  # greedy: the same text


def test_client_disconnect_frees_the_kv_blocks(serve_app):
    body = {"model": SERVED, "messages": MESSAGES, "max_tokens": 1500, "ignore_eos": True,
            "stream": True}
    url = f"{serve_app.base_url}/v1/chat/completions"
    with httpx.Client(timeout=60) as http, http.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        skip_to_first_content(r.iter_lines())
    # Workers keep no request state: the driver's block tables place every rank's KV, so its
    # free list is the KV of all three ranks.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        load = replica_load(serve_app)
        if load.num_running == 0 and load.kv_usage == 0:
            break
    assert (load.num_running, load.kv_usage) == (0, 0)


def read_stream(url: str, body: dict, started: threading.Event, events: list[str]) -> None:
    with httpx.Client(timeout=120) as http, http.stream("POST", url, json=body) as r:
        lines = r.iter_lines()
        skip_to_first_content(lines)
        started.set()
        events.extend(line for line in lines if line.startswith("data: "))


def test_killing_a_worker_rank_under_load_ends_streams_and_serve_replaces_the_group(serve_app):
    import ray
    from ray.exceptions import RayError

    (victim,) = serve_app.wait_for_replicas(1)
    url = f"{serve_app.base_url}/v1/chat/completions"
    streams = [[] for _ in range(3)]
    starts = [threading.Event() for _ in streams]
    threads = [threading.Thread(target=read_stream, args=(url, {
        "model": SERVED, "messages": [{"role": "user", "content": f"Count to {i} thousand."}],
        "max_tokens": 300, "ignore_eos": True, "stream": True}, started, events))
        for i, (started, events) in enumerate(zip(starts, streams))]
    for t in threads:
        t.start()
    assert all(s.wait(120) for s in starts)
    ray.kill(worker_actor(victim, 2), no_restart=True)
    for t in threads:
        t.join(600)  # every stream ends instead of hanging
    assert not any(t.is_alive() for t in threads)
    for events in streams:
        # an error event, or the whole answer when the stream resumed on the new replica
        assert events[-1] == "data: [DONE]"
        payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
        assert any("error" in p or any(c.get("finish_reason") for c in p.get("choices", []))
                   for p in payloads)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # Serve replaces the unhealthy replica and its workers
        try:
            ids = serve_app.replica_ids()
        except RayError:  # the load tracker may be restarting along with its owner
            ids = []
        if len(ids) == 1 and victim not in ids:
            break
        time.sleep(1)
    assert len(ids) == 1 and victim not in ids, ids
    worker_actor(ids[0], 2)  # the new group has its own workers
    client = serve_app.openai()
    done = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=4)
    assert done.choices[0].finish_reason == "length"
