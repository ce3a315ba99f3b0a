"""Closed-loop load for the serving benchmark: the same requests through the offline engine and
through the OpenAI API, each keeping `concurrency` requests in flight, timed per token."""
from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass, field

import openai

from bench.workloads import BenchRequest, Conversation, percentile
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams


@dataclass
class Sample:
    """One request: seconds to the first token and in all, gaps between token arrivals."""

    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    itls: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class Tracker:
    """Arrival times of one request's tokens."""

    start: float
    first: float | None = None
    last: float | None = None
    itls: list[float] = field(default_factory=list)

    def tokens_at(self, now: float) -> None:
        if self.first is None:
            self.first = now
        else:
            self.itls.append(now - self.last)
        self.last = now

    def sample(self, now: float, output_tokens: int, prompt_tokens: int = 0,
               cached_tokens: int = 0) -> Sample:
        first = self.first if self.first is not None else now
        return Sample(first - self.start, now - self.start, output_tokens, prompt_tokens,
                      cached_tokens, self.itls)


@dataclass
class RunStats:
    samples: list[Sample]
    elapsed: float

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.error is None]

    @property
    def errors(self) -> int:
        return len(self.samples) - len(self.ok)

    @property
    def request_rate(self) -> float:
        return len(self.ok) / self.elapsed

    @property
    def token_rate(self) -> float:
        return sum(s.output_tokens for s in self.ok) / self.elapsed

    def ttft_ms(self, q: float) -> float:
        return 1000 * percentile([s.ttft for s in self.ok], q)

    def tpot_ms(self, q: float) -> float:
        return 1000 * percentile([(s.e2e - s.ttft) / (s.output_tokens - 1)
                                  for s in self.ok if s.output_tokens > 1], q)

    def itl_ms(self, q: float) -> float:
        return 1000 * percentile([gap for s in self.ok for gap in s.itls], q)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run_offline(engine: LLMEngine, requests: list[BenchRequest], concurrency: int,
                tag: str) -> RunStats:
    """The engine's own step loop, admitting a new request whenever one finishes."""
    pending = deque(enumerate(requests))
    active: dict[str, Tracker] = {}
    samples: list[Sample] = []
    start = time.perf_counter()
    while pending or active:
        while pending and len(active) < concurrency:
            i, request = pending.popleft()
            request_id = f"{tag}-{i}"
            active[request_id] = Tracker(time.perf_counter())
            engine.add_request(request_id, request.prompt_token_ids, greedy(request.max_tokens))
        for out in engine.step():
            now = time.perf_counter()
            tracker = active[out.request_id]
            if out.token_ids:
                tracker.tokens_at(now)
            if out.finished:
                samples.append(tracker.sample(now, out.completion_tokens, out.prompt_tokens,
                                              out.cached_tokens))
                del active[out.request_id]
    return RunStats(samples, time.perf_counter() - start)


async def complete(client: openai.AsyncOpenAI, model: str, request: BenchRequest) -> Sample:
    """One streamed /v1/completions request with token-id prompt, timed per chunk."""
    tracker = Tracker(time.perf_counter())
    try:
        stream = await client.completions.create(
            model=model, prompt=request.prompt_token_ids, max_tokens=request.max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        usage = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                tracker.tokens_at(time.perf_counter())
            usage = chunk.usage or usage
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        return tracker.sample(time.perf_counter(), usage.completion_tokens,
                              usage.prompt_tokens, cached)
    except openai.APIError as e:
        return Sample(error=f"{type(e).__name__}: {e}")


async def run_served(client: openai.AsyncOpenAI, model: str, requests: list[BenchRequest],
                     concurrency: int) -> RunStats:
    """`concurrency` clients sending the requests back to back."""
    queue = deque(requests)
    samples: list[Sample] = []

    async def worker() -> None:
        while queue:
            samples.append(await complete(client, model, queue.popleft()))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return RunStats(samples, time.perf_counter() - start)


async def run_replica(handle, requests: list[BenchRequest], concurrency: int,
                      tag: str) -> RunStats:
    """`concurrency` callers sending the requests back to back straight to the model replica
    through a Serve handle: the replica's Ray side without the HTTP proxy and the ingress."""
    queue = deque(enumerate(requests))
    samples: list[Sample] = []

    async def worker() -> None:
        while queue:
            i, request = queue.popleft()
            tracker = Tracker(time.perf_counter())
            last = None
            async for last in handle.generate.remote(
                    request.prompt_token_ids, greedy(request.max_tokens), f"{tag}-{i}"):
                if last.token_ids:
                    tracker.tokens_at(time.perf_counter())
            assert last is not None and last.finished, "a replica stream ends with its finish"
            samples.append(tracker.sample(time.perf_counter(), last.completion_tokens,
                                          last.prompt_tokens, last.cached_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return RunStats(samples, time.perf_counter() - start)


async def converse(client: openai.AsyncOpenAI, model: str, conversation: Conversation,
                   max_tokens: int, think_s: float = 0.0) -> list[Sample]:
    """The conversation's turns in order, each repeating the whole history so far.

    Between turns the user reads for a random time averaging think_s.
    """
    rng = random.Random(conversation.system)
    messages = [{"role": "system", "content": conversation.system}]
    samples = []
    for turn, user in enumerate(conversation.user_turns):
        if turn and think_s:
            await asyncio.sleep(rng.uniform(0, 2 * think_s))
        messages.append({"role": "user", "content": user})
        tracker = Tracker(time.perf_counter())
        reply = ""
        try:
            stream = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
            usage = None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    tracker.tokens_at(time.perf_counter())
                    reply += chunk.choices[0].delta.content
                usage = chunk.usage or usage
            details = usage.prompt_tokens_details
            samples.append(tracker.sample(time.perf_counter(), usage.completion_tokens,
                                          usage.prompt_tokens,
                                          details.cached_tokens if details else 0))
        except openai.APIError as e:
            samples.append(Sample(error=f"{type(e).__name__}: {e}"))
        messages.append({"role": "assistant", "content": reply})
    return samples
