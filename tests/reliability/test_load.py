"""Sustained load: 64 concurrent streams for LOAD_SECONDS, with zero errors.

Each of 64 clients sends streaming chat requests back to back until the time is up. Every
stream must follow the whole streaming contract and end with [DONE]; afterwards `settled`
requires every KV block free on both replicas. PAGODA_LOAD_SECONDS lengthens the run (75 s
by default, what two shared CPU cores allow inside the suite's time budget).
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field

import httpx
import pytest

from .streams import chat_body, check_completed_chat, read_stream

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NUM_STREAMS = 64
LOAD_SECONDS = float(os.environ.get("PAGODA_LOAD_SECONDS", "75"))
STREAM_TIMEOUT_S = 240  # a stream waiting this long counts as hung
TOPICS = ["rivers", "bridges", "owls", "volcanoes", "lighthouses", "maps", "clocks", "tea",
          "glaciers", "bees", "trains", "comets", "forests", "harbours", "violins", "deserts"]


@dataclass
class LoadTally:
    streams: int = 0
    tokens: int = 0
    peak_running: int = 0
    peak_kv_usage: float = 0.0
    errors: list[str] = field(default_factory=list)


async def client(http: httpx.AsyncClient, index: int, deadline: float, tally: LoadTally) -> None:
    rng = random.Random(index)
    while time.monotonic() < deadline:
        max_tokens = rng.randint(8, 40)
        ignore_eos = rng.random() < 0.5
        topic = rng.choice(TOPICS)
        n = 2 if rng.random() < 0.125 else 1  # n>1 fans out to several replica calls
        body = chat_body(f"Client {index} asks: tell me one fact about {topic}.", max_tokens,
                         temperature=rng.choice([0.0, 0.7, 1.0]), seed=rng.randrange(1 << 30),
                         ignore_eos=ignore_eos, n=n, stream_options={"include_usage": True})
        try:
            result = await read_stream(http, body, STREAM_TIMEOUT_S)
            tally.tokens += check_completed_chat(result, max_tokens, ignore_eos, n)
            tally.streams += 1
        except (AssertionError, TimeoutError, httpx.HTTPError) as e:
            tally.errors.append(f"client {index}: {e!r}"[:300])


async def watch(service, tally: LoadTally, stop: asyncio.Event) -> None:
    """Samples the replicas' load every second: the load really was held."""
    while not stop.is_set():
        snap = await asyncio.to_thread(service.snapshot)
        if snap:
            tally.peak_running = max(tally.peak_running, sum(
                load.num_running + load.num_waiting for load in snap.loads.values()))
            tally.peak_kv_usage = max([tally.peak_kv_usage] +
                                      [load.kv_usage for load in snap.loads.values()])
        await asyncio.sleep(1)


async def run_load(service) -> LoadTally:
    tally = LoadTally()
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=NUM_STREAMS + 8)
    async with httpx.AsyncClient(base_url=service.base_url, limits=limits,
                                 timeout=STREAM_TIMEOUT_S) as http:
        watcher = asyncio.create_task(watch(service, tally, stop))
        deadline = time.monotonic() + LOAD_SECONDS
        await asyncio.gather(*(client(http, i, deadline, tally) for i in range(NUM_STREAMS)))
        stop.set()
        await watcher
    return tally


def test_64_concurrent_streams_hold_with_zero_errors(service):
    start = time.monotonic()
    tally = asyncio.run(run_load(service))
    elapsed = time.monotonic() - start
    print(f"\nload: {NUM_STREAMS} concurrent streams for {elapsed:.0f}s: {tally.streams} "
          f"streams, {tally.tokens} tokens, {len(tally.errors)} errors, peak "
          f"{tally.peak_running} requests in the engines, peak KV usage "
          f"{tally.peak_kv_usage:.0%}")
    assert not tally.errors, tally.errors[:5]
    assert tally.streams >= NUM_STREAMS  # every client finished at least one stream
    # the engines really held the load: most clients had a request in flight at once
    assert tally.peak_running >= NUM_STREAMS // 2
