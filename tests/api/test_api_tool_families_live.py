"""End to end per model family: a random-weight model with the family's tokenizer and chat
template, served by the real engine, its output driven into the family's call format by a
grammar (`structured_outputs`) and a logit bias towards the family's marker token. The parsers
are chosen from the model folder, as at start-up."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from api_helpers import check_chat_stream, post_stream
from families import random_model
from live_server import serve

pytestmark = pytest.mark.slow

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
# (what the model is driven to write, its marker token, the content the parse leaves)
OUTPUTS = {
    "hermes": (('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
                '{"city": "Paris"}}\n</tool_call>'), "<tool_call>", "Let me check."),
    "mistral": ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
                "[TOOL_CALLS]", None),
    "llama3_json": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
                    "<|python_tag|>", None),
}
THINKING = "The user wants the weather.\n</think>\n\nIt is sunny in Paris."


def driven(tokenizer, text: str, marker: str) -> dict:
    """Request fields that make any model write exactly `text`."""
    return {"structured_outputs": {"grammar": f"root ::= {json.dumps(text)}"},
            "logit_bias": {str(tokenizer.convert_tokens_to_ids(marker)): 100},
            "temperature": 0, "max_tokens": 100}


@pytest.fixture(scope="module")
def family_server(request, model_dir, tmp_path_factory):
    from workers.engine.async_engine import AsyncLLMEngine
    from workers.engine.config import EngineConfig

    def start(name: str):
        folder = random_model(name, model_dir, str(tmp_path_factory.mktemp(name)))
        engine = AsyncLLMEngine(EngineConfig(model=folder, max_model_len=512, num_kv_blocks=32,
                                             max_num_seqs=4))
        live = serve(engine)
        started.append((engine, live))
        return engine, httpx.Client(base_url=live.url, timeout=120), live.url

    started: list = []
    yield start
    for engine, live in started:
        live.stop()
        asyncio.run(engine.shutdown(drain=False))


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_family_tool_call_end_to_end(name, family_server):
    engine, http, url = family_server(name)
    text, marker, content = OUTPUTS[name]
    body = {"messages": MESSAGES, "tools": [WEATHER_TOOL],
            **driven(engine.tokenizer, text, marker)}

    prompt = http.post("/tokenize", json={"messages": MESSAGES, "tools": [WEATHER_TOOL]}).json()
    raw = http.post("/v1/completions", json={
        "prompt": prompt["tokens"], "skip_special_tokens": False, "logprobs": 0,
        **driven(engine.tokenizer, text, marker)}).json()["choices"][0]
    assert raw["text"] == text and marker in raw["logprobs"]["tokens"]  # the special token

    choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == content
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}

    [streamed], _ = check_chat_stream(post_stream(http, "/v1/chat/completions", body), 1, False)
    assert streamed.finish_reason == "tool_calls"
    assert streamed.content.strip() == (content or "")
    assert [(c["name"], c["arguments"]) for c in streamed.tool_calls.values()] == \
        [("get_weather", call["function"]["arguments"])]

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    extra = {k: body[k] for k in ("structured_outputs", "logit_bias")}
    with client.chat.completions.stream(model=engine.config.model_name,
                                        messages=MESSAGES, tools=[WEATHER_TOOL], temperature=0,
                                        max_tokens=100, extra_body=extra) as stream:
        final = stream.get_final_completion()
    [sdk_call] = final.choices[0].message.tool_calls
    assert (sdk_call.function.name, sdk_call.function.arguments) == \
        ("get_weather", call["function"]["arguments"])
    assert final.choices[0].finish_reason == "tool_calls"


def test_reasoning_opened_by_the_template_end_to_end(family_server):
    """DeepSeek-R1's template ends the prompt inside <think>: the output's reasoning comes
    before `</think>` with no opening tag of its own."""
    engine, http, _ = family_server("deepseek_r1")
    body = {"messages": MESSAGES, **driven(engine.tokenizer, THINKING, "</think>")}
    message = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message["reasoning_content"] == "The user wants the weather.\n"
    assert message["content"] == "\n\nIt is sunny in Paris."
    [streamed], _ = check_chat_stream(post_stream(http, "/v1/chat/completions", body), 1, False)
    assert (streamed.reasoning, streamed.content) == (message["reasoning_content"],
                                                      message["content"])
