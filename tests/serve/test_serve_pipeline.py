"""A model replica split into two pipeline stages (PP=2, gloo) on Serve, two micro-batches in
flight.

deploy/config.cpu-tp3.yaml with its engine split into two stages of one rank each: the
replica actor runs the first stage, a worker actor the second. Concurrent requests land in
different micro-batches and each still gets its own answer; a client that goes away frees its
KV blocks; killing the last stage's rank under load ends every stream and Serve replaces the
group.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from serve_helpers import disconnect_frees_kv, killing_a_rank_ends_streams, worker_actor

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SERVED = "smollm2-135m-instruct"
PROMPTS = ["Name three colours of the rainbow.", "Count from one to five.",
           "What is the capital of Italy?", "Write a haiku about rain."]


def serve_config() -> dict:
    config = yaml.safe_load((ROOT / "deploy" / "config.cpu-tp3.yaml").read_text())
    config["applications"][0]["args"]["engine"].update(tensor_parallel_size=1,
                                                        pipeline_parallel_size=2)
    return config


def ask(client, prompt: str) -> str:
    out = client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": prompt}], max_tokens=24,
        temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")
    return out.choices[0].message.content


def test_concurrent_requests_in_micro_batches_get_their_own_answers(serve_app):
    from ray.util.placement_group import placement_group_table

    (replica_id,) = serve_app.wait_for_replicas(1)
    worker_actor(replica_id, 1)  # the second stage
    groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"
              and len(g["bundles"]) == 2]
    assert len(groups) == 1 and groups[0]["strategy"] == "PACK"  # stages may span nodes
    client = serve_app.openai()
    alone = [ask(client, p) for p in PROMPTS]
    assert len(set(alone)) == len(PROMPTS)
    with ThreadPoolExecutor(len(PROMPTS) * 2) as pool:
        together = list(pool.map(lambda p: ask(client, p), PROMPTS * 2))
    assert together == alone * 2
    chunks = list(client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=24,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == alone[0]
    assert chunks[-2].choices[0].delta.content is None and chunks[-2].choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 24


def test_client_disconnect_frees_the_kv_blocks(serve_app):
    disconnect_frees_kv(serve_app, SERVED)


def test_killing_the_last_stage_under_load_ends_streams_and_serve_replaces_the_group(
        serve_app):
    killing_a_rank_ends_streams(serve_app, SERVED, rank=1)
    assert ask(serve_app.openai(), PROMPTS[0])
