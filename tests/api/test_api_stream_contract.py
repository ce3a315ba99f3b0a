"""The exact chunk sequence of streamed responses, read as raw SSE from a live server."""
from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from api_helpers import DONE, DyingClient, check_chat_stream, parse_sse, post_stream, wait_idle

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Name three colors."}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def whole(http: httpx.Client, body: dict) -> dict:
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_plain_stream_matches_whole_response(http):
    body = {"messages": QUESTION, "max_tokens": 12, "temperature": 0}
    [choice], usage = check_chat_stream(post_stream(http, "/v1/chat/completions", body), 1,
                                        include_usage=False)
    expected = whole(http, body)["choices"][0]
    assert usage is None
    assert choice.content == expected["message"]["content"]
    assert choice.finish_reason == expected["finish_reason"]


def test_include_usage_adds_one_final_usage_chunk(http):
    body = {"messages": QUESTION, "max_tokens": 7, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    [choice], usage = check_chat_stream(post_stream(http, "/v1/chat/completions", body), 1,
                                        include_usage=True)
    prompt = http.post("/tokenize", json={"messages": QUESTION}).json()
    assert choice.finish_reason == "length"
    assert usage["prompt_tokens"] == prompt["count"]
    assert usage["completion_tokens"] == 7
    assert usage["total_tokens"] == prompt["count"] + 7
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] <= prompt["count"]


def test_continuous_usage_stats_put_usage_so_far_on_every_chunk(http):
    body = {"messages": QUESTION, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "n": 2, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = post_stream(http, "/v1/chat/completions", body)
    assert events[-1] == DONE
    prompt = http.post("/tokenize", json={"messages": QUESTION}).json()["count"]
    completion = [u["completion_tokens"] for u in (e["usage"] for e in events[:-1])]
    assert all(e["usage"]["prompt_tokens"] == prompt for e in events[:-1])
    assert completion[:2] == [0, 0]  # the role chunks, before any token
    assert completion == sorted(completion) and completion[-1] == 10
    assert events[-2]["choices"] == [] and events[-3]["usage"]["completion_tokens"] == 10
    # without the flag, the default stream keeps usage off every chunk but the last
    plain = post_stream(http, "/v1/chat/completions", {
        **body, "stream_options": {"include_usage": True}})
    check_chat_stream(plain, 2, include_usage=True)


def test_n2_interleaves_choices_each_with_role_and_finish(http):
    body = {"messages": QUESTION, "max_tokens": 8, "n": 2, "seed": 7, "temperature": 1.0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    events = post_stream(http, "/v1/chat/completions", body)
    choices, usage = check_chat_stream(events, 2, include_usage=True)
    indices = [e["choices"][0]["index"] for e in events[:-2]]
    assert indices[:2] == [0, 1]  # both role chunks first
    assert [c.finish_reason for c in choices] == ["length", "length"]
    assert usage["completion_tokens"] == 16
    seeded = whole(http, {**body, "stream": False, "stream_options": None})
    assert [c.content for c in choices] == [c["message"]["content"] for c in seeded["choices"]]


def test_stop_string_ends_the_stream_before_it(http):
    body = {"messages": QUESTION, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    reference = whole(http, body)["choices"][0]["message"]["content"]
    stop = reference[len(reference) // 2:len(reference) // 2 + 3]
    assert stop.strip(), reference
    [choice], _ = check_chat_stream(
        post_stream(http, "/v1/chat/completions", {**body, "stop": [stop]}), 1, False)
    assert choice.finish_reason == "stop"
    assert choice.content == reference[:reference.index(stop)]


def test_logprobs_stream_with_content(http):
    body = {"messages": QUESTION, "max_tokens": 6, "temperature": 0, "logprobs": True,
            "top_logprobs": 3}
    [choice], _ = check_chat_stream(post_stream(http, "/v1/chat/completions", body), 1, False)
    assert len(choice.logprobs) == 6 or choice.finish_reason == "stop"
    assert "".join(e["token"] for e in choice.logprobs) == choice.content
    for entry in choice.logprobs:
        tops = entry["top_logprobs"]
        assert len(tops) == 3
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert entry["token"] == tops[0]["token"]  # greedy picks the most likely token
        assert bytes(entry["bytes"]).decode() == entry["token"]
        assert entry["logprob"] <= 0


def test_named_tool_call_streams_header_then_arguments(http):
    body = {"messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": [WEATHER_TOOL], "max_tokens": 40, "temperature": 0,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    [choice], _ = check_chat_stream(post_stream(http, "/v1/chat/completions", body), 1, False)
    assert choice.finish_reason == "tool_calls" and choice.content == ""
    [call] = choice.tool_calls.values()
    assert call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER_TOOL["function"]["parameters"])
    message = whole(http, body)["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "get_weather",
                                                    "arguments": call["arguments"]}


def test_json_schema_stream_validates(http):
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    body = {"messages": [{"role": "user", "content": "Invent a person as JSON."}],
            "max_tokens": 60, "temperature": 0,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "person", "schema": schema}}}
    [choice], _ = check_chat_stream(post_stream(http, "/v1/chat/completions", body), 1, False)
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.content), schema)


def test_completions_stream(http):
    body = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
            "n": 2, "stream_options": {"include_usage": True}}
    events = post_stream(http, "/v1/completions", body)
    assert events[-1] == DONE
    chunks, usage_chunk = events[:-2], events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 12
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in chunks:
        assert chunk["object"] == "text_completion" and chunk["usage"] is None
        assert (chunk["id"], chunk["created"]) == (chunks[0]["id"], chunks[0]["created"])
        [choice] = chunk["choices"]
        assert choice["index"] not in finishes, "text after the finish chunk"
        if choice["finish_reason"] is not None:
            assert choice["text"] == ""
            finishes[choice["index"]] = choice["finish_reason"]
        texts[choice["index"]] += choice["text"]
    expected = http.post("/v1/completions", json={**body, "stream": False,
                                                  "stream_options": None}).json()
    assert [texts[0], texts[1]] == [c["text"] for c in expected["choices"]]
    assert finishes == {c["index"]: c["finish_reason"] for c in expected["choices"]}


def test_error_mid_stream_is_an_event_then_done(engine):
    """A replica dying mid-stream (injected after the real engine's first output) ends the
    stream with an error event and [DONE], and the request's blocks are freed."""
    from live_server import LiveServer

    from app.api import build_app
    from app.settings import Settings

    live = LiveServer(build_app(DyingClient(engine), Settings()))
    try:
        body = {"messages": QUESTION, "max_tokens": 50, "ignore_eos": True, "stream": True}
        response = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60)
        events = parse_sse(response.text)
    finally:
        live.stop()
    assert response.status_code == 200
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    error, done = events[-2], events[-1]
    assert done == DONE
    assert set(error) == {"error"} and error["error"]["code"] == "engine_dead"
    assert set(error["error"]) == {"message", "type", "param", "code"}
    stats = wait_idle(engine)
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_client_disconnect_aborts_and_frees_blocks(server, engine):
    body = {"messages": QUESTION, "max_tokens": 400, "ignore_eos": True, "stream": True}
    steps_before = engine.step_count
    with httpx.Client(timeout=60) as http, \
            http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        data = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                data.append(line)
            if len(data) == 3:
                break
        assert engine.stats()["num_running"] == 1
    stats = wait_idle(engine)
    assert stats["num_free_blocks"] == stats["num_blocks"]
    assert engine.step_count - steps_before < 400  # stopped early, not run to max_tokens


def test_disconnect_before_a_whole_response_aborts(server, engine):
    body = {"messages": QUESTION, "max_tokens": 400, "ignore_eos": True, "n": 2}
    steps_before = engine.step_count
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=1.0)
    stats = wait_idle(engine)
    assert stats["num_free_blocks"] == stats["num_blocks"]
    assert engine.step_count - steps_before < 400
