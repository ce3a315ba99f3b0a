"""Bad input: schemathesis cases from our OpenAPI document and hypothesis-made raw bodies.

Whatever arrives, the answer is never a 5xx: a 2xx that matches the document, or a 4xx with
an OpenAI-shaped error; the replicas stay up (`settled`) and the service answers afterwards.
Generated requests ask for at most OUTPUT_CAP tokens (larger in-range max_tokens are lowered,
missing ones set) so a case costs well under a second; out-of-range lengths are still sent.
"""
from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.api_helpers import DONE, parse_sse

from .service import SERVED
from .streams import check_error

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

OUTPUT_CAP = 8
MAX_MODEL_LEN = 2048
# (method, path, examples per generation mode)
OPERATIONS = [("POST", "/v1/chat/completions", 40), ("POST", "/v1/completions", 40),
              ("POST", "/tokenize", 20), ("POST", "/detokenize", 20),
              ("GET", "/v1/models/{name}", 10)]
GENERATES = {"/v1/chat/completions", "/v1/completions"}
RAW_PATHS = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]
RAW_EXAMPLES = 300
FUZZ_SETTINGS = settings(deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(HealthCheck),
                         phases=[Phase.explicit, Phase.generate])


def bound_cost(path: str, body: object) -> None:
    """Names the served model and caps the output of generating requests, in place."""
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = SERVED  # random names only test the 404, covered by /v1/models/{name}
    if path not in GENERATES:
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None or (type(value) is int and OUTPUT_CAP < value < MAX_MODEL_LEN):
            body[key] = OUTPUT_CAP


def check_answer(status: int, content_type: str, text: str) -> None:
    assert status < 500, f"{status}: {text[:500]}"
    if status >= 400:
        check_error(json.loads(text)["error"])
    elif content_type.startswith("text/event-stream"):
        events = parse_sse(text)
        assert events[-1] == DONE
        assert not any(isinstance(e, dict) and "error" in e for e in events), text[-500:]
    else:
        json.loads(text)


@pytest.mark.parametrize(("method", "path", "examples", "mode"), [
    (method, path, examples, mode) for method, path, examples in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if not (mode == GenerationMode.NEGATIVE and method == "GET")])  # any name is a valid path
def test_schema_cases_never_get_a_server_error(service, method, path, examples, mode):
    statuses: Counter[int] = Counter()
    reasons: Counter[str] = Counter()
    operation = schemathesis.openapi.from_url(f"{service.base_url}/openapi.json")[path][method]

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        bound_cost(path, case.body)
        response = case.call(base_url=service.base_url, timeout=120)
        statuses[response.status_code] += 1
        check_answer(response.status_code, response.headers.get("content-type", [""])[0],
                     response.text)
        if response.status_code >= 400:
            reasons[response.json()["error"]["message"][:70]] += 1
        if response.status_code < 300 or mode == GenerationMode.POSITIVE:
            case.validate_response(response, checks=[
                status_code_conformance, content_type_conformance,
                response_schema_conformance])

    run()
    print(f"\nschemathesis {mode.value} {method} {path}: {dict(statuses)}; most common "
          f"errors: {reasons.most_common(3)}")
    assert sum(statuses.values()) >= examples // 2
    check_still_serving(service.base_url)


# raw bodies

JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12)
VALID_BODIES = {
    "/v1/chat/completions": {"model": SERVED, "max_tokens": 4,
                             "messages": [{"role": "user", "content": "Hi"}]},
    "/v1/completions": {"model": SERVED, "max_tokens": 4, "prompt": "Once upon a time"},
    "/tokenize": {"model": SERVED, "prompt": "Hello"},
    "/detokenize": {"model": SERVED, "tokens": [1, 2, 3]},
}
FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p",
          "n", "stop", "stream", "stream_options", "logprobs", "top_logprobs", "logit_bias",
          "response_format", "tools", "tool_choice", "seed", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "min_tokens", "stop_token_ids", "echo",
          "suffix", "tokens", "add_generation_prompt", "continue_final_message",
          "chat_template_kwargs", "max_completion_tokens", "skip_special_tokens"]


@st.composite
def mutated_body(draw, path: str) -> bytes:
    """A valid body with a few fields replaced by any JSON value (NaN and Infinity too)."""
    body = dict(VALID_BODIES[path])
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(FIELDS))
        if draw(st.booleans()) and key in body:
            del body[key]
        else:
            body[key] = draw(JSON_VALUES)
    bound_cost(path, body)
    return json.dumps(body).encode()


@st.composite
def nested_body(draw, path: str) -> bytes:
    """A field nested deeper than any parser's recursion limit, or a little."""
    depth = draw(st.sampled_from([10, 500, 5000, 100000]))
    key = draw(st.sampled_from(["messages", "prompt", "tokens", "logit_bias", "stop"]))
    body = json.dumps({**VALID_BODIES[path], key: None})
    opening, closing = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    nested = opening * depth + "1" + closing * depth
    return body.replace(f'"{key}": null', f'"{key}": {nested}').encode()


@st.composite
def raw_request(draw) -> tuple[str, bytes, str]:
    path = draw(st.sampled_from(RAW_PATHS))
    valid = json.dumps(VALID_BODIES[path]).encode()
    body = draw(st.one_of(
        mutated_body(path), nested_body(path), st.binary(max_size=300),
        st.builds(lambda v: json.dumps(v).encode(), JSON_VALUES),
        st.integers(0, len(valid) - 1).map(lambda n: valid[:n]),  # truncated JSON
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    ))
    content_type = draw(st.sampled_from(["application/json", "text/plain",
                                         "application/x-www-form-urlencoded", ""]))
    return path, body, content_type


def test_raw_malformed_bodies_never_get_a_server_error(service):
    statuses: Counter[int] = Counter()
    with httpx.Client(base_url=service.base_url, timeout=120) as http:
        @settings(FUZZ_SETTINGS, max_examples=RAW_EXAMPLES)
        @given(request=raw_request())
        def run(request: tuple[str, bytes, str]) -> None:
            path, body, content_type = request
            headers = {"content-type": content_type} if content_type else {}
            response = http.post(path, content=body, headers=headers)
            statuses[response.status_code] += 1
            check_answer(response.status_code, response.headers.get("content-type", ""),
                         response.text)

        run()
    print(f"\nraw bodies: {sum(statuses.values())} requests, statuses {dict(statuses)}")
    check_still_serving(service.base_url)


def check_still_serving(base_url: str) -> None:
    body = {**VALID_BODIES["/v1/chat/completions"], "temperature": 0}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
