"""A model replica split over three ranks (deploy/config.cpu-tp3.yaml: TP=3, gloo) on Serve.

The replica actor is rank 0 and two worker actors hold the other shards, in the replica's
placement group. It answers the OpenAI API like a single-device replica; a client that goes
away frees its KV blocks; killing a worker rank under load ends every stream (resumed, or an
error event and [DONE]) and Serve replaces the whole group.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from serve_helpers import disconnect_frees_kv, killing_a_rank_ends_streams, worker_actor

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SERVED = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
TP = 3


def serve_config() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "config.cpu-tp3.yaml").read_text())


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
    disconnect_frees_kv(serve_app, SERVED)


def test_killing_a_worker_rank_under_load_ends_streams_and_serve_replaces_the_group(serve_app):
    killing_a_rank_ends_streams(serve_app, SERVED, rank=2)
    client = serve_app.openai()
    done = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=4)
    assert done.choices[0].finish_reason == "length"
