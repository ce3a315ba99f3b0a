"""Responses API streams read as raw SSE: OpenAI's event order and sequence numbers for text,
tool calls, reasoning and several items; failures, disconnects, and the HTTP surface."""
from __future__ import annotations

import httpx
import pytest
from api_helpers import DyingClient, wait_idle
from live_server import LiveServer, serve
from responses_helpers import check_response_stream, parse_named_sse, post_response_stream
from test_api_parsers_live import THINK_TURNS, TOOL_TURNS, raw_text

from app.api import build_app
from app.settings import Settings

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "name": "get_weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}


def as_items(messages: list[dict]) -> list[dict]:
    """Chat turns as Responses input items."""
    items = []
    for message in messages:
        for call in message.get("tool_calls") or []:
            items.append({"type": "function_call", "call_id": call["id"],
                          **call["function"]})
        if message.get("content") is not None:
            items.append({"role": message["role"], "content": message["content"]})
    return items


def without_ids(response: dict) -> list[dict]:
    """Output items less what differs between two runs (ids)."""
    return [{k: v for k, v in item.items() if k not in ("id", "call_id")}
            for item in response["output"]]


def stream_and_whole(http: httpx.Client, body: dict) -> tuple[list[dict], dict, dict]:
    events = post_response_stream(http, body)
    final = check_response_stream(events)
    whole = http.post("/v1/responses", json=body)
    assert whole.status_code == 200, whole.text
    assert without_ids(final) == without_ids(whole.json())
    usage, whole_usage = final["usage"], whole.json()["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["output_tokens_details"]) == \
        (whole_usage["input_tokens"], whole_usage["output_tokens"],
         whole_usage["output_tokens_details"])  # cached tokens differ: the prefix cache
    return events, final, whole.json()


def test_text_stream_order(http):
    body = {"input": "Name a colour.", "instructions": "Be brief.", "max_output_tokens": 40,
            "temperature": 0}
    events, final, _ = stream_and_whole(http, body)
    assert [e["type"] for e in events[:4]] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added"]
    assert [e["type"] for e in events[-4:]] == [
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) > 1 and len(events) == len(deltas) + 8
    assert final["status"] == "completed" and final["completed_at"] is not None


def test_incomplete_stream_ends_with_response_incomplete(http):
    events = post_response_stream(http, {"input": "Write a long story.", "temperature": 0,
                                         "max_output_tokens": 4})
    final = check_response_stream(events)
    assert events[-1]["type"] == "response.incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][-1]["status"] == "incomplete"
    assert final["usage"]["output_tokens"] == 4


def test_forced_tool_call_stream(http):
    body = {"input": "Weather in Paris?", "tools": [WEATHER], "max_output_tokens": 40,
            "tool_choice": {"type": "function", "name": "get_weather"}, "temperature": 0}
    events, final, _ = stream_and_whole(http, body)
    [call] = final["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    types = [e["type"] for e in events]
    assert types[2] == "response.output_item.added"
    assert set(types[3:-3]) == {"response.function_call_arguments.delta"}
    assert types[-3:] == ["response.function_call_arguments.done",
                          "response.output_item.done", "response.completed"]


def test_auto_tool_call_stream_matches_the_raw_text(http):
    raw = raw_text(http, TOOL_TURNS, [{"type": "function", "function": {
        k: v for k, v in WEATHER.items() if k != "type"}}])
    assert "<tool_call>" in raw, f"the prompt no longer leads the model to a call: {raw!r}"
    body = {"input": as_items(TOOL_TURNS), "tools": [WEATHER], "max_output_tokens": 60,
            "temperature": 0}
    _, final, _ = stream_and_whole(http, body)
    calls = [i for i in final["output"] if i["type"] == "function_call"]
    assert calls and calls[0]["name"] == "get_weather"
    assert calls[0]["arguments"] in raw


def test_reasoning_and_message_are_two_items(thinking):
    raw = raw_text(thinking, THINK_TURNS)
    assert raw.startswith("<think>"), f"the prompt no longer leads the model to think: {raw!r}"
    body = {"input": as_items(THINK_TURNS), "max_output_tokens": 60, "temperature": 0}
    events, final, _ = stream_and_whole(thinking, body)
    reasoning, message = final["output"]
    assert reasoning["type"] == "reasoning" and message["type"] == "message"
    thought = reasoning["content"][0]["text"]
    assert f"<think>{thought}</think>{message['content'][0]['text']}" == raw
    assert any(e["type"] == "response.reasoning_text.delta" for e in events)
    assert 0 < final["usage"]["output_tokens_details"]["reasoning_tokens"] < \
        final["usage"]["output_tokens"]


def test_error_mid_stream_is_response_failed(engine):
    live = LiveServer(build_app(DyingClient(engine), Settings()))
    try:
        body = {"input": "Write a long story.", "max_output_tokens": 50, "stream": True}
        response = httpx.post(f"{live.url}/v1/responses", json=body, timeout=60)
        events = parse_named_sse(response.text)
        final = check_response_stream(events)
        stored = httpx.get(f"{live.url}/v1/responses/{final['id']}")
    finally:
        live.stop()
    assert response.status_code == 200 and events[-1]["type"] == "response.failed"
    assert final["status"] == "failed"
    assert final["error"] == {"code": "server_error", "message": "The engine is unavailable."}
    assert stored.status_code == 404
    stats = wait_idle(engine)
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_client_disconnect_aborts_and_frees_blocks(server, engine):
    body = {"input": "Write a long story about a dragon.", "max_output_tokens": 400,
            "stream": True}
    with httpx.Client(timeout=60) as http, \
            http.stream("POST", f"{server.url}/v1/responses", json=body) as response:
        data = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                data.append(line)
            if len(data) == 5:
                break
        assert engine.stats()["num_running"] == 1
    stats = wait_idle(engine)
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_get_delete_bodies_errors_and_metrics(http):
    created = http.post("/v1/responses", json={"input": "Hi.", "max_output_tokens": 5}).json()
    assert http.get(f"/v1/responses/{created['id']}").json() == created
    deleted = http.delete(f"/v1/responses/{created['id']}")
    assert deleted.json() == {"id": created["id"], "object": "response.deleted",
                              "deleted": True}
    missing = http.get(f"/v1/responses/{created['id']}")
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == f"Response with id '{created['id']}' not found."
    for body, param in [({"input": [{"type": "web_search_call"}]}, "input.0.type"),
                        ({"input": "x", "previous_response_id": "resp_x"},
                         "previous_response_id"),
                        ({"input": "x", "text": {"format": {"type": "json_schema"}}},
                         "text.format.schema"),
                        ({"input": "x", "tools": [WEATHER],
                          "tool_choice": {"type": "function", "name": "other"}}, "tool_choice"),
                        ({"input": []}, "input")]:
        error = http.post("/v1/responses", json=body)
        assert error.status_code in (400, 404) and error.json()["error"]["param"] == param, \
            error.text
    metrics = http.get("/metrics").text
    assert 'endpoint="responses"' in metrics


def test_api_key_guards_responses(engine):
    live = serve(engine, api_key="sekret")
    try:
        for method, path in [("POST", "/v1/responses"), ("GET", "/v1/responses/resp_1"),
                             ("DELETE", "/v1/responses/resp_1")]:
            response = httpx.request(method, f"{live.url}{path}", json={"input": "x"})
            assert response.status_code == 401
        ok = httpx.post(f"{live.url}/v1/responses", timeout=60,
                        headers={"Authorization": "Bearer sekret"},
                        json={"input": "x", "max_output_tokens": 2})
        assert ok.status_code == 200
    finally:
        live.stop()


def test_disconnect_before_a_whole_response_aborts(server, engine):
    body = {"input": "Write a long story about a dragon.", "max_output_tokens": 400}
    steps_before = engine.step_count
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/responses", json=body, timeout=1.0)
    stats = wait_idle(engine)
    assert stats["num_free_blocks"] == stats["num_blocks"]
    assert engine.step_count - steps_before < 400
