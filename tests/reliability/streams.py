"""Streaming clients for the reliability tests: read an SSE response with a deadline, and
classify how it ended (completed, error event, HTTP error)."""
from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field

import httpx

from tests.api.api_helpers import DONE, check_chat_stream

from .service import SERVED

ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class StreamResult:
    status: int
    events: list[dict | str] = field(default_factory=list)
    error: dict | None = None  # the OpenAI error object, from the body or an error event
    arrivals: list[float] = field(default_factory=list)  # monotonic time of each event

    @property
    def longest_gap_s(self) -> float:
        """The longest wait between two events (a stall the client saw)."""
        return max((b - a for a, b in itertools.pairwise(self.arrivals)), default=0.0)

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == DONE

    @property
    def completed(self) -> bool:
        return self.status == 200 and self.done and self.error is None


def chat_body(content: str, max_tokens: int, **extra) -> dict:
    return {"model": SERVED, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "stream": True, **extra}


def check_error(error: object) -> dict:
    """An error as OpenAI shapes it: message, type, param and code."""
    assert isinstance(error, dict) and set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "server_error"), error
    return error


async def read_stream(http: httpx.AsyncClient, body: dict, timeout_s: float,
                      path: str = "/v1/chat/completions") -> StreamResult:
    """The whole SSE response; raises TimeoutError if it does not end within timeout_s."""
    async with asyncio.timeout(timeout_s), http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            payload = json.loads(await r.aread())
            return StreamResult(r.status_code, error=check_error(payload.get("error")))
        result = StreamResult(200)
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            payload = line[len("data: "):]
            result.arrivals.append(time.monotonic())
            if payload == DONE:
                result.events.append(DONE)
                continue
            assert not result.done, "an event after [DONE]"
            data = json.loads(payload)
            if "error" in data:
                assert result.error is None, "two error events"
                result.error = check_error(data["error"])
            result.events.append(data)
        return result


def check_completed_chat(result: StreamResult, max_tokens: int, ignore_eos: bool,
                         n: int = 1) -> int:
    """Asserts the full chat stream contract; returns the completion token count."""
    assert result.completed, (result.status, result.error, result.events[-2:])
    choices, usage = check_chat_stream(result.events, n=n, include_usage=True)
    assert all(choice.finish_reason in ("stop", "length") for choice in choices)
    tokens = usage["completion_tokens"]
    assert n <= tokens <= n * max_tokens
    if ignore_eos:
        assert tokens == n * max_tokens
        assert all(choice.finish_reason == "length" for choice in choices)
    return tokens
