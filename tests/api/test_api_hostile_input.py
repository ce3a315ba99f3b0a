"""Hostile input: every client mistake is a 400 in OpenAI's shape, and no error message says
where in a library it failed."""
from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest
from live_server import serve

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def chat(http: httpx.Client, **fields) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2,
                                                   **fields})


@pytest.mark.parametrize("template", [
    '{"messages": [{"role": "user", "content": "Hi"}], "seed": %s}',
    '{"messages": [{"role": "user", "content": "Hi"}], "extra": {"deep": [1, %s]}}',
    '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": -%s}',
])
def test_integers_beyond_the_digit_limit_are_400(http, template):
    body = template % ("7" * 5000)
    response = http.post("/v1/chat/completions", content=body,
                         headers={"content-type": "application/json"})
    error = error_of(response, 400)
    assert error["type"] == "invalid_request_error" and "digits" in error["message"]
    assert "set_int_max_str_digits" not in error["message"]


@pytest.mark.parametrize("fields", [
    {"seed": 2**64},
    {"seed": -(2**63) - 1},
    {"seed": 2**64 - 1, "n": 2},  # choice 1 would use seed + 1
])
def test_seeds_torch_cannot_take_are_400(http, fields):
    error = error_of(chat(http, temperature=1.0, **fields), 400)
    assert error["param"] == "seed" and str(fields["seed"]) in error["message"]


def test_the_largest_seeds_work(http):
    assert chat(http, temperature=1.0, seed=2**64 - 1).status_code == 200
    assert chat(http, temperature=1.0, seed=2**64 - 2, n=2).status_code == 200
    assert chat(http, temperature=1.0, seed=-(2**63)).status_code == 200


def test_top_k_beyond_int64_is_400_and_int64_max_works(http):
    assert error_of(chat(http, top_k=2**63), 400)["param"] == "top_k"
    assert chat(http, top_k=2**63 - 1, temperature=1.0).status_code == 200


@pytest.mark.parametrize("key", ["²", "１２", "٣", "1" * 40, "+5", " 5"])
def test_logit_bias_keys_that_are_not_ascii_integers_are_400(http, key):
    error = error_of(chat(http, logit_bias={key: 1}), 400)
    assert error["param"] == "logit_bias"


@pytest.mark.parametrize("name", ["conversation", "tokenize", "messages", "documents",
                                  "add_generation_prompt", "return_assistant_tokens_mask"])
def test_chat_template_kwargs_cannot_take_the_renderers_names(http, name):
    error = error_of(chat(http, chat_template_kwargs={name: True}), 400)
    assert error["param"] == "chat_template_kwargs" and name in error["message"]


def test_other_chat_template_kwargs_reach_the_template(http):
    assert chat(http, chat_template_kwargs={"enable_thinking": False}).status_code == 200


def test_deeply_nested_json_schema_is_400(http):
    schema: dict = {"type": "string"}
    for _ in range(100):
        schema = {"type": "object", "properties": {"a": schema}}
    fmt = {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}
    error = error_of(chat(http, response_format=fmt), 400)
    assert error["param"] == "response_format"


@pytest.mark.parametrize("schema", [
    {"type": "string", "pattern": "(?<=a)b"},
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
    {"type": "integer", "minimum": 5, "maximum": 1},
])
def test_grammar_compiler_errors_do_not_leak(http, schema):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    error = error_of(chat(http, response_format=fmt), 400)
    assert error["param"] == "response_format"
    for internal in (".cc", ".cpp", "/project/", "xgrammar", "Traceback"):
        assert internal not in error["message"], error["message"]


def test_tiny_temperature_is_greedy(http):
    body = {"messages": [{"role": "user", "content": "Name three rivers."}], "max_tokens": 12}
    greedy = http.post("/v1/chat/completions", json={**body, "temperature": 0}).json()
    tiny = http.post("/v1/chat/completions", json={**body, "temperature": 1e-39}).json()
    text = greedy["choices"][0]["message"]["content"]
    assert text and tiny["choices"][0]["message"]["content"] == text


@pytest.mark.parametrize("name", ["get</tool_call>x", "a" * 65, "has space", "", "naïve"])
def test_tool_names_follow_openais_rule(http, name):
    tool = {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
    error = error_of(chat(http, tools=[tool]), 400)
    assert error["param"].startswith("tools.0.function.name")
    choice = {"type": "function", "function": {"name": name}}
    error = error_of(chat(http, tools=[WEATHER], tool_choice=choice), 400)
    assert error["param"].startswith("tool_choice")


def test_tool_names_at_the_limit_work(http):
    name = "a-Z_0" * 12 + "abcd"
    tool = {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
    assert len(name) == 64 and chat(http, tools=[tool]).status_code == 200


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain",
                                          "multipart/form-data; boundary=x"])
def test_bodies_that_are_not_json_are_415(http, content_type):
    response = http.post("/v1/chat/completions", content=b'{"messages": []}',
                         headers={"content-type": content_type})
    assert error_of(response, 415)["code"] == "unsupported_media_type"


def test_json_content_types_are_accepted(http):
    body = b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}'
    for headers in ({"content-type": "application/json; charset=utf-8"}, {}):
        response = http.post("/v1/chat/completions", content=body, headers=headers)
        assert response.status_code == 200, response.text


def test_bodies_over_the_limit_are_413(engine):
    live = serve(engine, max_request_bytes=4096)
    try:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            long = [{"role": "user", "content": "x" * 5000}]
            error = error_of(http.post("/v1/chat/completions", json={"messages": long}), 413)
            assert error["code"] == "request_too_large" and "4096" in error["message"]
            # no Content-Length: the body is counted as it arrives
            chunks = (b'{"messages": [{"role": "user", "content": "' + b"x" * 1000
                      for _ in range(8))
            response = http.post("/tokenize", content=chunks,
                                 headers={"content-type": "application/json"})
            assert error_of(response, 413)["code"] == "request_too_large"
            assert chat(http).status_code == 200
    finally:
        live.stop()


def test_prompts_times_n_beyond_the_queues_is_400(http, engine):
    room = engine.config.max_num_seqs + engine.config.max_waiting_requests
    prompts = ["Hi"] * (room // 2 + 1)
    response = http.post("/v1/completions", json={"prompt": prompts, "n": 2, "max_tokens": 1})
    error = error_of(response, 400)
    assert error["param"] == "n" and str(room) in error["message"]


def test_huge_chat_prompt_is_400_before_tokenizing(http):
    huge = [{"role": "user", "content": "word " * 400_000}]
    error = error_of(http.post("/v1/chat/completions", json={"messages": huge}), 400)
    assert error["code"] == "context_length_exceeded" and "characters" in error["message"]


def test_tokenizing_a_large_input_does_not_stall_the_ingress(engine):
    """/health answers while a 6 MB prompt is being tokenized. On the event loop, /health would
    wait for the tokenizer: compared with the tokenizer's own time, not a clock's."""
    data = json.dumps({"prompt": "many words to count " * 300_000}).encode()
    uploaded = threading.Event()

    def body():
        for start in range(0, len(data), 1 << 16):
            yield data[start:start + (1 << 16)]
        uploaded.set()

    server = serve(engine, max_request_bytes=len(data) + 1)
    try:
        with httpx.Client(base_url=server.url, timeout=300) as slow, \
                httpx.Client(base_url=server.url, timeout=300) as quick, \
                concurrent.futures.ThreadPoolExecutor(1) as pool:
            sent = time.monotonic()
            tokenizing = pool.submit(slow.post, "/tokenize", content=body(),
                                     headers={"content-type": "application/json"})
            assert uploaded.wait(120)
            time.sleep(0.5)  # the server has read the body and is tokenizing (for seconds)
            asked = time.monotonic()
            assert quick.get("/health").status_code == 200
            health_s = time.monotonic() - asked
            assert tokenizing.result().json()["count"] > 1_000_000
            tokenize_s = time.monotonic() - sent
    finally:
        server.stop()
    assert health_s < tokenize_s / 4, (health_s, tokenize_s)
