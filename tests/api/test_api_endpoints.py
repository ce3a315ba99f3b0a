"""Models, tokenize/detokenize, health, metrics, request ids, and the output itself checked
against transformers."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


def test_the_in_process_engine_is_an_engine_client(engine):
    from app.engine_client import EngineClient

    assert isinstance(engine, EngineClient)


def test_tokenize_round_trip_and_chat_prompt_count(http, engine):
    text = "Paris is the capital of France."
    tokenized = http.post("/tokenize", json={"prompt": text}).json()
    assert tokenized["tokens"] == engine.tokenizer.encode(text)
    assert tokenized["count"] == len(tokenized["tokens"])
    assert tokenized["max_model_len"] == engine.config.context_len
    assert http.post("/detokenize", json={"tokens": tokenized["tokens"]}).json() == \
        {"prompt": text}
    chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
    expected = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                    tokenize=False)
    assert chat["tokens"] == engine.tokenizer.encode(expected, add_special_tokens=False)
    usage = http.post("/v1/chat/completions",
                      json={"messages": MESSAGES, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == chat["count"]


def test_health(http):
    response = http.get("/health")
    assert response.status_code == 200


def test_openapi_document_is_served_and_lists_every_endpoint(http):
    document = http.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    operations = [op for path in document["paths"].values() for op in path.values()]
    assert operations and all("422" not in op["responses"] for op in operations)  # always 400
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses",
                 "/v1/responses/{response_id}", "/v1/models", "/tokenize", "/detokenize"):
        assert path in document["paths"], path
    body = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith(
        "ChatCompletionRequest")


def test_request_id_is_echoed_or_made(http):
    assert http.get("/v1/models", headers={"x-request-id": "abc-123"}) \
        .headers["x-request-id"] == "abc-123"
    response = http.post("/v1/chat/completions", json={"messages": [], "x": 1},
                         headers={"x-request-id": "err-1"})
    assert response.status_code == 400 and response.headers["x-request-id"] == "err-1"
    assert http.get("/health").headers["x-request-id"]


def test_metrics_count_requests_tokens_and_latency(http):
    body = {"messages": MESSAGES, "max_tokens": 3, "ignore_eos": True, "temperature": 0}
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    assert http.post("/v1/chat/completions", json={**body, "stream": True}).status_code == 200
    http.post("/v1/chat/completions", json={**body, "temperature": 7})
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    requests = {(s.labels["endpoint"], s.labels["status"], s.labels["finish_reason"]): s.value
                for s in families["pagoda_requests"].samples if s.name.endswith("_total")}
    assert requests[("chat", "200", "length")] >= 2
    assert requests[("chat", "400", "none")] >= 1
    generated = [s.value for s in families["pagoda_generation_tokens"].samples
                 if s.name.endswith("_total") and s.labels["endpoint"] == "chat"]
    assert generated[0] >= 6
    for name in ("pagoda_time_to_first_token_seconds", "pagoda_inter_token_latency_seconds",
                 "pagoda_e2e_request_latency_seconds"):
        counts = [s.value for s in families[name].samples if s.name.endswith("_count")]
        assert counts and counts[0] >= 2
    assert "pagoda_engine_kv_usage" in families


def test_greedy_chat_matches_transformers(http, engine, model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    prompt = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    expected = engine.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    answer = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    if answer["finish_reason"] == "stop":  # stopped at EOS: transformers stopped there too
        assert expected.startswith(answer["message"]["content"])
    else:
        assert answer["message"]["content"] == expected
