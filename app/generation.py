"""The generation run every endpoint shares: start one engine call per choice, then stream or
collect their outputs; the metrics timer and the engine calls end however the client leaves."""
from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol

from fastapi import Request, Response

from app.disconnect import collect_unless_disconnected, start_unless_disconnected
from app.fanout import Fanout, Job
from app.ingress import Ingress
from app.streaming import EventStream, sse_body
from workers.engine.errors import ContextLengthError
from workers.engine.outputs import RequestOutput

Outputs = AsyncIterator[tuple[int, RequestOutput]]  # (choice index, output) as they arrive


class Generation(Protocol):
    """What an endpoint adds: its engine calls and how their outputs become a response."""

    endpoint: str  # the metrics label
    what: str  # what the client calls the prompt, named in context-length errors
    jobs: list[Job]
    prompt_tokens: int
    done: str  # the stream's last event

    def completion_tokens(self) -> int: ...

    def record(self, index: int, out: RequestOutput) -> None:
        """Take in an output of a whole (not streamed) response."""

    def events(self, outputs: Outputs) -> AsyncGenerator[str, None]: ...

    async def respond(self) -> Response:
        """The whole response, once every output is recorded."""
        ...

    def finish_reason(self) -> str: ...


async def run_generation(ingress: Ingress, raw: Request, gen: Generation, stream: bool
                         ) -> Response:
    timer = ingress.metrics.timer(gen.endpoint, getattr(raw.state, "arrival", time.monotonic()))
    fanout = Fanout(ingress.client, gen.jobs)
    try:
        if not await start_unless_disconnected(raw, fanout):
            return Response(status_code=499)
    except ContextLengthError as e:
        raise e.named(gen.what) from None

    async def observed() -> Outputs:
        async for index, out in fanout.outputs():
            timer.observe(index, out)
            yield index, out

    def finish() -> None:
        timer.finish(gen.prompt_tokens, gen.completion_tokens())

    if stream:
        async def events() -> AsyncGenerator[str, None]:
            inner = gen.events(observed())
            async with contextlib.aclosing(inner):
                async for item in inner:
                    yield item
            raw.state.finish_reason = gen.finish_reason()

        body = sse_body(events(), raw, ingress.settings.retry_after_s, finish, gen.done)
        return EventStream(body, on_close=fanout.close)

    async def collect() -> None:
        async for index, out in observed():
            gen.record(index, out)

    if not await collect_unless_disconnected(raw, fanout, collect(), finish):
        return Response(status_code=499)
    response = await gen.respond()
    raw.state.finish_reason = gen.finish_reason()
    return response

