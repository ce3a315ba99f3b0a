"""`serve run deploy/config.yaml` on loopback, driven through the openai SDK."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from serve_helpers import skip_to_first_content

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "smollm2-135m-instruct"
SERVED = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


def serve_config() -> dict:
    # As shipped, in float32: greedy text is compared token for token with transformers, and
    # bf16 (`dtype: auto` on CPUs with native bf16) may part from it at a near-tie. The other
    # serve modules run the shipped dtype. The fixture only moves it to a free loopback port.
    config = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())
    config["applications"][0]["args"]["engine"]["dtype"] = "float32"
    return config


def test_models_lists_the_served_model(serve_app):
    assert [m.id for m in serve_app.openai().models.list().data] == [SERVED]


def test_stream_and_non_stream_agree_under_greedy(serve_app):
    client = serve_app.openai()
    full = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=12,
                                          temperature=0)
    choice = full.choices[0]
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 12 and full.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(
        model=SERVED, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_greedy_output_matches_transformers(serve_app):
    transformers = pytest.importorskip("transformers")
    import torch

    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    got = serve_app.openai().chat.completions.create(
        model=SERVED, messages=MESSAGES, max_tokens=10, temperature=0)
    assert got.choices[0].message.content == expected


def test_completions_endpoint_stops_at_max_tokens(serve_app):
    got = serve_app.openai().completions.create(model=SERVED, prompt="The sky is", max_tokens=5,
                                                temperature=0)
    assert got.choices[0].finish_reason in ("stop", "length")
    assert 1 <= got.usage.completion_tokens <= 5
    if got.choices[0].finish_reason == "length":
        assert got.usage.completion_tokens == 5


def test_engine_errors_become_openai_errors(serve_app):
    client = serve_app.openai(max_retries=0)
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model=SERVED, max_tokens=4,
            messages=[{"role": "user", "content": "word " * 3000}])  # beyond max_model_len
    assert error.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=4,
                                       temperature=7)
    assert error.value.param == "temperature"


def test_client_disconnect_aborts_the_request_on_its_replica(serve_app):
    body = {"model": SERVED, "messages": MESSAGES, "max_tokens": 1500, "ignore_eos": True,
            "stream": True}
    url = f"{serve_app.base_url}/v1/chat/completions"
    with httpx.Client(timeout=60) as http, http.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        skip_to_first_content(lines)
        assert running_requests(serve_app) == 1
    # 1500 tokens take far longer than this on a CPU: only an abort frees the replica so soon
    deadline = time.monotonic() + 10
    while running_requests(serve_app) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_requests(serve_app) == 0


def running_requests(serve_app) -> int:
    time.sleep(0.6)  # two report intervals
    return sum(load.num_running + load.num_waiting for load in serve_app.snapshot().loads.values())


def test_metrics_cover_requests_by_status_and_latency(serve_app):
    text = httpx.get(f"{serve_app.base_url}/metrics", timeout=10).text
    samples = {}
    for line in text.splitlines():
        if line.startswith("pagoda_") and " " in line:
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert any(k.startswith("pagoda_time_to_first_token_seconds_count") and v > 0
               for k, v in samples.items())
    assert any(k.startswith("pagoda_requests_total") and 'status="400"' in k
               for k in samples)
    assert any(k.startswith("pagoda_generation_tokens_total") and v > 0
               for k, v in samples.items())


def test_stream_events_are_json_until_done(serve_app):
    body = {"model": SERVED, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    r = httpx.post(f"{serve_app.base_url}/v1/chat/completions", json=body, timeout=60)
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_replica_metrics_reach_the_ray_metrics_endpoint(serve_app):
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = ("ray_pagoda_replica_time_to_first_token_seconds_count",
              "ray_pagoda_replica_generation_tokens_total", "ray_pagoda_replica_kv_usage",
              "ray_pagoda_replica_num_running", "ray_pagoda_replica_requests_total")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # Ray exports on an interval
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing
    assert re.search(r'ray_pagoda_replica_requests_total\{[^}]*finish_reason="length"', text)
