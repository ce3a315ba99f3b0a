"""Disconnect storm: clients drop mid-stream at random while witness streams run beside them.

Droppers ask for long generations (EOS ignored) and leave at random points: before the
response starts, after a few events, after a random time, or by abandoning a non-streaming
request. Without aborts those requests would keep the replicas busy for minutes; `settled`
then requires both replicas idle with every KV block free within seconds. The witnesses must
finish untouched: the full streaming contract and exactly the tokens they asked for.
Afterwards the ingress has counted exactly one 499 (finish_reason "abort") per client that
left and no 5xx, and its log has no traceback.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import time

import httpx
import pytest

from .service import ingress_logs, log_sizes, logged_since, request_counts
from .streams import chat_body, check_completed_chat, read_stream

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NUM_WAVES = 3
DROPPERS_PER_WAVE = 32
NUM_WITNESSES = 8
WITNESS_TOKENS = 24
DROPPER_TOKENS = 400  # minutes of work at the storm's batch size: only an abort ends it soon


def dropper_request(rng: random.Random, index: int) -> tuple[str, dict]:
    kind = rng.choice(["chat", "chat", "chat_n2", "completion"])
    prompt = f"Dropper {index}: describe a long journey across the mountains, step by step."
    if kind == "completion":
        return "/v1/completions", {"prompt": prompt, "max_tokens": DROPPER_TOKENS,
                                   "ignore_eos": True, "stream": True}
    extra = {"n": 2} if kind == "chat_n2" else {}
    return "/v1/chat/completions", chat_body(prompt, DROPPER_TOKENS, ignore_eos=True, **extra)


async def drop(http: httpx.AsyncClient, rng: random.Random, index: int) -> str:
    """Sends one long request and leaves at a random point; returns how it left."""
    path, body = dropper_request(rng, index)
    how = rng.choice(["before_headers", "after_events", "after_time", "non_streaming"])
    if how == "before_headers":
        with contextlib.suppress(TimeoutError):
            # long enough for the request to reach the ingress through a busy proxy
            async with asyncio.timeout(rng.uniform(1.0, 2.5)), \
                    http.stream("POST", path, json=body) as r:
                await r.aread()
        return how
    if how == "non_streaming":
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(rng.uniform(0.5, 4.0)):
                await http.post(path, json={**body, "stream": False})
        return how
    events_wanted = rng.randint(1, 12)
    leave_at = time.monotonic() + rng.uniform(0.5, 5.0)
    async with asyncio.timeout(120), http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, await r.aread()
        seen = 0
        async for line in r.aiter_lines():
            seen += line.startswith("data: ")
            if how == "after_events" and seen >= events_wanted:
                break
            if how == "after_time" and time.monotonic() >= leave_at:
                break
            assert line != "data: [DONE]", "a dropper's stream finished before it left"
    return how


async def witness(http: httpx.AsyncClient, index: int) -> int:
    body = chat_body(f"Witness {index}: name a colour.", WITNESS_TOKENS, temperature=0,
                     ignore_eos=True, stream_options={"include_usage": True})
    result = await read_stream(http, body, timeout_s=240)
    return check_completed_chat(result, WITNESS_TOKENS, ignore_eos=True)


async def storm(base_url: str) -> tuple[list[str], list[int]]:
    rng = random.Random(1234)
    limits = httpx.Limits(max_connections=DROPPERS_PER_WAVE + NUM_WITNESSES + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:
        witnesses = asyncio.gather(*(witness(http, i) for i in range(NUM_WITNESSES)))
        left: list[str] = []
        for wave in range(NUM_WAVES):
            left += await asyncio.gather(*(drop(http, rng, wave * DROPPERS_PER_WAVE + i)
                                           for i in range(DROPPERS_PER_WAVE)))
        return left, await witnesses


def wait_counted(base_url: str, before: dict, left: int, timeout_s: float = 30) -> dict:
    """Request counts once the ingress has recorded every dropper (or timeout_s passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = request_counts(base_url)
        gone = counts.get(("499", "abort"), 0) - before.get(("499", "abort"), 0)
        if gone >= left or time.monotonic() > deadline:
            return counts
        time.sleep(0.5)


def test_disconnect_storm_frees_every_block_and_spares_other_streams(service):
    before = service.snapshot().loads
    counted = request_counts(service.base_url)
    logs = log_sizes(ingress_logs())
    left, witnessed = asyncio.run(storm(service.base_url))
    counts = {how: left.count(how) for how in sorted(set(left))}
    print(f"\nstorm: {len(left)} dropped requests {counts}, {len(witnessed)} witness streams "
          f"of {WITNESS_TOKENS} tokens completed")
    assert witnessed == [WITNESS_TOKENS] * NUM_WITNESSES
    assert len(counts) == 4  # every way of leaving was exercised
    time.sleep(0.6)  # two load reports
    after = service.snapshot().loads
    reached = sum(after[r].num_requests - before[r].num_requests for r in after if r in before)
    # the replicas saw the droppers (those that left before routing never reached one)
    assert reached >= len(left) // 2
    counts = wait_counted(service.base_url, counted, len(left))
    change = {key: counts[key] - counted.get(key, 0) for key in counts
              if counts[key] != counted.get(key, 0)}
    print(f"ingress requests by (status, finish_reason) during the storm: {change}")
    assert change.get(("499", "abort"), 0) == len(left)
    assert not [key for key in change if key[0].startswith("5")]
    logged = logged_since(logs)
    assert "Traceback" not in logged and "never retrieved" not in logged, logged[-3000:]
    # the `settled` fixture now requires both replicas idle with every block free
