"""Raw SSE parsing and the streaming contract every chat stream must follow."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

DONE = "[DONE]"


def parse_sse(body: str) -> list[dict | str]:
    """Events of an SSE body; each must be exactly `data: <payload>\\n\\n`."""
    assert body.endswith("\n\n"), f"body does not end with a blank line: {body[-40:]!r}"
    events: list[dict | str] = []
    for block in body[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, f"bad event {block!r}"
        payload = block[len("data: "):]
        events.append(DONE if payload == DONE else json.loads(payload))
    return events


def post_stream(http: httpx.Client, path: str, body: dict) -> list[dict | str]:
    response = http.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return parse_sse(response.text)


@dataclass
class ChoiceStream:
    content: str = ""
    reasoning: str = ""
    tool_calls: dict[int, dict] = field(default_factory=dict)
    finish_reason: str | None = None
    logprobs: list[dict] = field(default_factory=list)
    chunks: list[dict] = field(default_factory=list)  # every chunk of this choice, in order


def check_chat_stream(events: list[dict | str], n: int, include_usage: bool
                      ) -> tuple[list[ChoiceStream], dict | None]:
    """Asserts the chat streaming contract; returns what each choice said and the usage."""
    assert events[-1] == DONE and DONE not in events[:-1]
    chunks = events[:-1]
    first = chunks[0]
    usage = None
    if include_usage:
        last = chunks[-1]
        assert last["choices"] == [] and last["usage"] is not None
        usage = last["usage"]
        chunks = chunks[:-1]
    choices = [ChoiceStream() for _ in range(n)]
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert (chunk["id"], chunk["created"], chunk["model"]) == \
            (first["id"], first["created"], first["model"])
        assert chunk["id"].startswith("chatcmpl-")
        assert "usage" in chunk and chunk["usage"] is None
        assert len(chunk["choices"]) == 1
        choice = chunk["choices"][0]
        choices[choice["index"]].chunks.append(choice)
    for index, stream in enumerate(choices):
        role, *middle, finish = stream.chunks
        assert role["delta"] == {"role": "assistant", "content": ""}
        assert role["finish_reason"] is None
        assert finish["delta"] == {} and finish["finish_reason"] is not None, finish
        stream.finish_reason = finish["finish_reason"]
        for choice in middle:
            delta = choice["delta"]
            assert "role" not in delta and delta, f"choice {index}: bad delta {delta}"
            assert choice["finish_reason"] is None
            stream.content += delta.get("content") or ""
            stream.reasoning += delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls") or []:
                record_tool_delta(stream.tool_calls, call)
        for choice in stream.chunks:
            stream.logprobs += (choice.get("logprobs") or {}).get("content") or []
    return choices, usage


def record_tool_delta(calls: dict[int, dict], delta: dict) -> None:
    """Tool-call deltas as OpenAI streams them: a header, then argument fragments."""
    index = delta["index"]
    if index not in calls:
        assert delta["id"].startswith("call_") and delta["type"] == "function"
        assert delta["function"]["arguments"] == "" and delta["function"]["name"]
        calls[index] = {"id": delta["id"], "name": delta["function"]["name"], "arguments": ""}
        return
    assert set(delta) == {"index", "function"} and set(delta["function"]) == {"arguments"}
    calls[index]["arguments"] += delta["function"]["arguments"]


def wait_idle(engine, timeout_s: float = 30.0) -> dict:
    """Engine stats once nothing runs or waits; fails if that does not happen in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"engine did not go idle: {engine.stats()}")


class DyingClient:
    """An engine client whose replica dies right after each request's first real output."""

    def __init__(self, inner) -> None:
        self.inner, self.config, self.tokenizer = inner, inner.config, inner.tokenizer
        self.max_choices = inner.max_choices
        self.abort, self.stats, self.is_alive = inner.abort, inner.stats, inner.is_alive

    async def generate(self, prompt_token_ids, params, request_id):
        from workers.engine.errors import EngineDeadError

        stream = self.inner.generate(prompt_token_ids, params, request_id)
        try:
            async for out in stream:
                yield out
                raise EngineDeadError("replica died")
        finally:
            await stream.aclose()
