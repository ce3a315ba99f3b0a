"""Autoscaling for real: load beyond target_ongoing_requests adds a replica, streams running
across the scale-up all complete, and once the load is gone Serve scales back down, letting
an in-flight stream finish."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from serve_helpers import running_replicas

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SERVED = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Count slowly to one hundred."}]


def serve_config() -> dict:
    config = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())
    args = config["applications"][0]["args"]
    args["engine"]["num_threads"] = 1  # two replicas share the two cores
    args["replicas"].update(min_replicas=1, max_replicas=2, initial_replicas=1,
                            target_ongoing_requests=2, max_ongoing_requests=8,
                            upscale_delay_s=1, downscale_delay_s=8,
                            graceful_shutdown_timeout_s=60)
    return config


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def stream_tokens(client, max_tokens: int) -> tuple[int, str | None]:
    """Streams one chat completion; (content chunks received, finish_reason)."""
    stream = client.chat.completions.create(
        model=SERVED, messages=MESSAGES, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    finish, usage = None, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        usage = chunk.usage or usage
    return usage.completion_tokens, finish


def test_load_adds_a_replica_and_its_absence_removes_it(serve_app):
    wait_for(lambda: running_replicas() == 1, 120, "one replica at start")
    client = serve_app.openai(timeout=600, max_retries=0)
    with ThreadPoolExecutor(8) as pool:
        # 8 long streams against a target of 2 ongoing requests per replica
        streams = [pool.submit(stream_tokens, client, 160) for _ in range(8)]
        wait_for(lambda: running_replicas() == 2, 300, "a second replica under load")
        assert [s.result() for s in streams] == [(160, "length")] * 8
    assert len(serve_app.wait_for_replicas(2)) == 2  # the new replica also joined the tracker

    with ThreadPoolExecutor(1) as pool:
        # one request in flight is below the target: Serve stops a replica while it runs
        in_flight = pool.submit(stream_tokens, client, 200)
        wait_for(lambda: running_replicas() == 1, 180, "scale-down to one replica")
        assert in_flight.result() == (200, "length")
    assert stream_tokens(client, 8) == (8, "length")
