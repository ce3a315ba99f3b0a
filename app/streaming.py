"""Server-sent events: `data: <json>\\n\\n` per chunk, `data: [DONE]` last, and the chunk
builders that keep `id`, `created` and `model` equal on every chunk of a response."""
from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable

import anyio
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from app.errors import to_api_error
from app.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    Usage,
)

DONE = "data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: BaseModel | dict) -> str:
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def sse_body(events: AsyncGenerator[str, None], raw: Request, retry_after_s: int,
                   on_end: Callable[[], None], done: str = DONE) -> AsyncIterator[str]:
    """The frame of every stream: its events, then `done` (`[DONE]`, or nothing where the
    events end themselves); an error once streaming has begun goes out as an error event before
    it. `on_end` runs however the stream ends; closing the engine streams is EventStream's
    `on_close`."""
    raw.state.finish_reason = "abort"  # until the events end normally
    try:
        try:
            async with contextlib.aclosing(events):
                async for item in events:
                    yield item
        except Exception as e:  # noqa: BLE001 - after the stream started, any error is an event
            raw.state.finish_reason = "error"
            yield event(to_api_error(e, retry_after_s).body())
        if done:
            yield done
    finally:
        on_end()


class EventStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends, even when the client left
    before the first byte and the body was never iterated."""

    def __init__(self, body: AsyncIterable[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(body, media_type=MEDIA_TYPE, headers=HEADERS)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.on_close()


class ChatChunks:
    """`live_usage`, when given, puts the usage so far on every chunk (continuous usage)."""

    def __init__(self, response_id: str, created: int, model: str,
                 live_usage: Callable[[], Usage] | None = None) -> None:
        self.response_id = response_id
        self.created = created
        self.model = model
        self.live_usage = live_usage

    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        if usage is None and self.live_usage is not None:
            usage = self.live_usage()
        return event(ChatCompletionChunk(id=self.response_id, created=self.created,
                                         model=self.model, choices=choices, usage=usage))

    def role(self, index: int) -> str:
        return self.delta(index, DeltaMessage(role="assistant", content=""))

    def delta(self, index: int, delta: DeltaMessage, logprobs: ChatLogprobs | None = None) -> str:
        return self.chunk([ChatChunkChoice(index=index, delta=delta, logprobs=logprobs)])

    def finish(self, index: int, reason: str, logprobs: ChatLogprobs | None = None) -> str:
        return self.chunk([ChatChunkChoice(index=index, delta=DeltaMessage(), logprobs=logprobs,
                                           finish_reason=reason)])

    def usage(self, usage: Usage) -> str:
        return self.chunk([], usage)


class CompletionChunks:
    def __init__(self, response_id: str, created: int, model: str) -> None:
        self.response_id = response_id
        self.created = created
        self.model = model

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return event(CompletionResponse(id=self.response_id, created=self.created,
                                        model=self.model, choices=choices, usage=usage))

    def text(self, index: int, text: str, logprobs: CompletionLogprobs | None = None,
             finish_reason: str | None = None) -> str:
        return self.chunk([CompletionChoice(index=index, text=text, logprobs=logprobs,
                                            finish_reason=finish_reason)])

    def usage(self, usage: Usage) -> str:
        return self.chunk([], usage)
