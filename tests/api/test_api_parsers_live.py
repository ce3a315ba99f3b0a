"""Tool calls the model writes itself (tool_choice auto) and `<think>` reasoning, end to end.

The small model is led by a few earlier turns to answer in the wanted form; the raw text it
writes for the same prompt (read through /v1/completions) is the reference the parsed
response must reconstruct.
"""
from __future__ import annotations

import json

import httpx
import pytest
from api_helpers import check_chat_stream, post_stream

pytestmark = pytest.mark.slow

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}}


def earlier_call(city: str, i: int) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{
        "id": f"call_{i}", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]}


TOOL_TURNS = [{"role": "user", "content": "Weather in Paris?"}, earlier_call("Paris", 1),
              {"role": "user", "content": "Weather in Rome?"}, earlier_call("Rome", 2),
              {"role": "user", "content": "Weather in Berlin?"}]
THINK_TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>2 plus 2 makes 4.</think>The answer is 4."},
    {"role": "user", "content": "What is 3+3?"},
    {"role": "assistant", "content": "<think>3 plus 3 makes 6.</think>The answer is 6."},
    {"role": "user", "content": "What is 4+4?"}]


def raw_text(http: httpx.Client, messages: list[dict], tools: list[dict] | None = None) -> str:
    prompt = http.post("/tokenize", json={"messages": messages, "tools": tools}).json()["tokens"]
    response = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 60,
                                                  "temperature": 0})
    return response.json()["choices"][0]["text"]


def test_auto_tool_call_whole_and_streamed(http):
    raw = raw_text(http, TOOL_TURNS, [WEATHER_TOOL])
    assert "<tool_call>" in raw, f"the prompt no longer leads the model to a call: {raw!r}"
    body = {"messages": TOOL_TURNS, "tools": [WEATHER_TOOL], "max_tokens": 60,
            "temperature": 0}
    choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    [call] = choice["message"]["tool_calls"]
    payload = raw.split("<tool_call>")[1].split("</tool_call>")[0]
    assert json.loads(payload) == {"name": call["function"]["name"],
                                   "arguments": json.loads(call["function"]["arguments"])}
    assert choice["finish_reason"] == "tool_calls"
    [streamed], _ = check_chat_stream(post_stream(http, "/v1/chat/completions", body), 1, False)
    assert streamed.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed.tool_calls.values()] == \
        [(call["function"]["name"], call["function"]["arguments"])]


def test_tool_choice_none_leaves_text_alone(http):
    body = {"messages": TOOL_TURNS, "tools": [WEATHER_TOOL], "tool_choice": "none",
            "max_tokens": 60, "temperature": 0}
    message = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert "tool_calls" not in message and message["content"] == raw_text(http, TOOL_TURNS)


def test_reasoning_content_whole_and_streamed(thinking):
    raw = raw_text(thinking, THINK_TURNS)
    assert raw.startswith("<think>"), f"the prompt no longer leads the model to think: {raw!r}"
    body = {"messages": THINK_TURNS, "max_tokens": 60, "temperature": 0}
    message = thinking.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert f"<think>{message['reasoning_content']}</think>{message['content']}" == raw
    [streamed], _ = check_chat_stream(post_stream(thinking, "/v1/chat/completions", body), 1,
                                      False)
    assert (streamed.reasoning, streamed.content) == (message["reasoning_content"],
                                                      message["content"])
