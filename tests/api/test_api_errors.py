"""Every bad input answers with OpenAI's error shape and the right status, never 422/500."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from live_server import MAX_MODEL_LEN, MAX_N, LiveServer, serve

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Hi"}]


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "errors.pydantic.dev" not in body["error"]["message"]
    return body["error"]


def chat(http: httpx.Client, **fields) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2,
                                                   **fields})


@pytest.mark.parametrize("fields, param, number", [
    ({"temperature": 2.5}, "temperature", "2.5"),
    ({"temperature": -0.1}, "temperature", "-0.1"),
    ({"top_p": 0}, "top_p", "0"),
    ({"top_p": 1.5}, "top_p", "1.5"),
    ({"n": 0}, "n", "0"),
    ({"n": MAX_N + 1}, "n", str(MAX_N + 1)),
    ({"max_tokens": 0}, "max_tokens", "0"),
    ({"presence_penalty": 3}, "presence_penalty", "3"),
    ({"top_logprobs": 2}, "top_logprobs", None),
    ({"logprobs": True, "top_logprobs": 50}, "logprobs", "50"),
    ({"logit_bias": {"not-a-token": 1}}, "logit_bias", None),
    ({"stream_options": {"include_usage": True}}, "stream_options", None),
])
def test_invalid_values(http, fields, param, number):
    error = error_of(chat(http, **fields), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if number is not None:
        assert number in error["message"]


def test_invalid_values_in_streaming_requests_are_http_errors(http):
    response = chat(http, temperature=9, stream=True)
    assert error_of(response, 400)["param"] == "temperature"


def test_empty_messages(http):
    error = error_of(http.post("/v1/chat/completions", json={"messages": []}), 400)
    assert error["param"] == "messages"


def test_prompt_beyond_context_names_the_numbers(http):
    long = [{"role": "user", "content": "word " * (MAX_MODEL_LEN + 10)}]
    error = error_of(http.post("/v1/chat/completions", json={"messages": long}), 400)
    count = http.post("/tokenize", json={"messages": long}).json()["count"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert str(MAX_MODEL_LEN) in error["message"] and str(count) in error["message"]


def test_max_tokens_beyond_context_names_the_numbers(http):
    count = http.post("/tokenize", json={"messages": MESSAGES}).json()["count"]
    error = error_of(chat(http, max_tokens=MAX_MODEL_LEN), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert str(MAX_MODEL_LEN) in error["message"]
    assert f"{count + MAX_MODEL_LEN} tokens ({count} in the messages" in error["message"]


def test_completion_prompt_beyond_context(http):
    response = http.post("/v1/completions", json={"prompt": "a " * (MAX_MODEL_LEN + 5)})
    assert error_of(response, 400)["code"] == "context_length_exceeded"


def test_unknown_model_is_404(http):
    error = error_of(chat(http, model="gpt-17"), 404)
    assert error["code"] == "model_not_found" and "gpt-17" in error["message"]
    assert error_of(http.get("/v1/models/gpt-17"), 404)["code"] == "model_not_found"


@pytest.mark.parametrize("content, headers", [
    (b"this is not json", {"content-type": "application/json"}),
    (b"", {"content-type": "application/json"}),
    (b"[1, 2]", {"content-type": "application/json"}),
    (b"\xff\xfe\xfa", {"content-type": "application/json"}),
])
def test_non_json_bodies_are_400(http, content, headers):
    error_of(http.post("/v1/chat/completions", content=content, headers=headers), 400)


@pytest.mark.parametrize("body, param", [
    ({"messages": "hello"}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": MESSAGES, "n": "many"}, "n"),
])
def test_schema_violations_are_readable_400s(http, body, param):
    error = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == param and param in error["message"]


def test_unsupported_content_part(http):
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}
    assert error_of(http.post("/v1/chat/completions", json=body), 400)["param"] == \
        "messages.0.content"


def test_invalid_json_schema(http):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}}
    assert error_of(chat(http, response_format=fmt), 400)["param"] == "response_format"


def test_out_of_vocabulary_prompt_tokens(http):
    response = http.post("/v1/completions", json={"prompt": [1, 10**9], "max_tokens": 2})
    assert error_of(response, 400)["param"] == "prompt"


def test_unknown_fields_are_ignored(http):
    response = chat(http, frobnicate={"x": 1}, user="someone", store=True)
    assert response.status_code == 200, response.text


def test_unknown_route_is_an_openai_404(http):
    error_of(http.get("/v1/nothing-here"), 404)


def test_api_key(engine):
    live = serve(engine, api_key="sk-test")
    try:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            assert error_of(http.get("/v1/models"), 401)["code"] == "invalid_api_key"
            wrong = {"Authorization": "Bearer sk-wrong"}
            error_of(http.post("/v1/chat/completions", json={"messages": MESSAGES},
                               headers=wrong), 401)
            assert http.get("/health").status_code == 200
            assert http.get("/metrics").status_code == 200
            assert http.get("/openapi.json").status_code == 200
            good = {"Authorization": "Bearer sk-test"}
            assert http.get("/v1/models", headers=good).status_code == 200
    finally:
        live.stop()


def test_full_queue_is_503_with_retry_after(model_dir):
    from app.api import build_app
    from app.settings import Settings
    from workers.engine.async_engine import AsyncLLMEngine
    from workers.engine.config import EngineConfig

    full = AsyncLLMEngine(EngineConfig(model=model_dir, max_model_len=MAX_MODEL_LEN,
                                       num_kv_blocks=16, max_waiting_requests=0))
    live = LiveServer(build_app(full, Settings(retry_after_s=2)))
    try:
        response = httpx.post(f"{live.url}/v1/chat/completions",
                              json={"messages": MESSAGES, "stream": True}, timeout=60)
    finally:
        live.stop()
        asyncio.run(full.shutdown(drain=False))
    error = error_of(response, 503)
    assert response.headers["retry-after"] == "2" and error["code"] == "queue_full"
