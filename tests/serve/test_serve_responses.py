"""The Responses API through `serve run` with two ingress replicas: every replica sees the
responses the other stored, through the shared store actor."""
from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from serve_helpers import running_replicas

from workers.store.response_store import STORE_ACTOR, STORE_NAMESPACE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SERVED = "smollm2-135m-instruct"
GREEDY = {"model": SERVED, "temperature": 0, "max_output_tokens": 20}


def serve_config() -> dict:
    config = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())
    args = config["applications"][0]["args"]
    args["ingress"]["num_replicas"] = 2
    args["replicas"].update(min_replicas=1, max_replicas=1)
    return config


def wait_for_ingress_replicas(count: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if running_replicas("PagodaIngress") == count:
            return
        time.sleep(1)
    raise TimeoutError(f"expected {count} running ingress replicas")


def test_conversation_and_store_span_ingress_replicas(serve_app):
    import ray

    wait_for_ingress_replicas(2)
    client = serve_app.openai(max_retries=0, timeout=300)
    first = client.responses.create(input="My name is Ada.", **GREEDY)
    with client.responses.stream(input="What is my name?", previous_response_id=first.id,
                                 **GREEDY) as stream:
        events = list(stream)
    assert events[-1].type in ("response.completed", "response.incomplete")  # at 20 tokens
    second = events[-1].response
    assert second.output_text == "".join(
        e.delta for e in events if e.type == "response.output_text.delta")
    third = client.responses.create(input="Again?", previous_response_id=second.id, **GREEDY)
    assert third.usage.input_tokens > second.usage.input_tokens > first.usage.input_tokens
    ids = [first.id, second.id, third.id]
    with httpx.Client(base_url=serve_app.base_url, timeout=60) as http:
        # the proxy spreads these over both ingress replicas; each must find every response
        for _ in range(4):
            for response_id in ids:
                assert http.get(f"/v1/responses/{response_id}").json()["id"] == response_id
        store = ray.get_actor(STORE_ACTOR, namespace=STORE_NAMESPACE)
        assert all(ray.get(store.get.remote(response_id)) for response_id in ids)
        assert http.delete(f"/v1/responses/{first.id}").json()["deleted"] is True
        for _ in range(4):
            assert http.get(f"/v1/responses/{first.id}").status_code == 404
    assert ray.get(store.get.remote(first.id)) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.create(input="x", previous_response_id=first.id, **GREEDY)
