"""The official openai SDK, unchanged, against the live server."""
from __future__ import annotations

import json

import jsonschema
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Say hello."}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def test_models(client, model_name):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]
    assert client.models.retrieve(model_name).id == model_name


def test_chat_whole_and_streamed_agree(client, model_name):
    kwargs = {"model": model_name, "messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    pieces = [chunk for chunk in client.chat.completions.create(**kwargs, stream=True)]
    text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert text == whole.choices[0].message.content
    assert pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stream_helper(client, model_name):
    with client.chat.completions.stream(model=model_name, messages=MESSAGES, max_tokens=8,
                                        temperature=0, extra_body={"ignore_eos": True},
                                        stream_options={"include_usage": True}) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.current_completion_snapshot  # get_final_completion refuses "length"
    assert "".join(deltas) == final.choices[0].message.content
    assert final.choices[0].finish_reason == "length" and final.usage.completion_tokens == 8


def test_max_completion_tokens_and_seed(client, model_name):
    kwargs = {"model": model_name, "messages": MESSAGES, "max_completion_tokens": 5, "seed": 3,
              "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert first.usage.completion_tokens == 5 and first.choices[0].finish_reason == "length"
    assert first.choices[0].message.content == second.choices[0].message.content


def test_n_choices(client, model_name):
    result = client.chat.completions.create(model=model_name, messages=MESSAGES, n=3,
                                            max_tokens=4, extra_body={"ignore_eos": True})
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert result.usage.completion_tokens == 12


def test_completions(client, model_name):
    whole = client.completions.create(model=model_name, prompt="Once upon a time",
                                      max_tokens=6, temperature=0, logprobs=2, echo=True)
    choice = whole.choices[0]
    assert choice.text.startswith("Once upon a time")
    generated = choice.text[len("Once upon a time"):]
    # echo + logprobs: the prompt's tokens are scored too, the first one has no logprob
    assert "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.text_offset[0] == 0 and choice.logprobs.token_logprobs[0] is None
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    assert all(len(top or {}) <= 2 for top in choice.logprobs.top_logprobs)
    streamed = client.completions.create(model=model_name, prompt="Once upon a time",
                                         max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == generated


def test_echo_of_a_one_token_prompt_scores_it(client, model_name, http):
    [token] = http.post("/tokenize", json={"prompt": "Hello"}).json()["tokens"]
    choice = client.completions.create(model=model_name, prompt=[token], max_tokens=2,
                                       temperature=0, logprobs=1, echo=True).choices[0]
    assert choice.text.startswith("Hello") and "".join(choice.logprobs.tokens) == choice.text
    assert len(choice.logprobs.tokens) == 3 and choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.text_offset[:2] == [0, 5]


def test_completions_with_token_prompts(client, model_name, http):
    tokens = http.post("/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    by_ids = client.completions.create(model=model_name, prompt=[tokens, tokens], max_tokens=4,
                                       temperature=0)
    by_text = client.completions.create(model=model_name, prompt="Hello world", max_tokens=4,
                                        temperature=0)
    assert [c.text for c in by_ids.choices] == [by_text.choices[0].text] * 2
    assert by_ids.usage.prompt_tokens == 2 * by_text.usage.prompt_tokens


def test_forced_tool_call(client, model_name):
    result = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Weather in Rome?"}],
        tools=[WEATHER_TOOL], tool_choice="required", max_tokens=40, temperature=0)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments),
                        WEATHER_TOOL["function"]["parameters"])


def test_streamed_tool_call_through_the_helper(client, model_name):
    with client.chat.completions.stream(
            model=model_name, messages=[{"role": "user", "content": "Weather in Oslo?"}],
            tools=[WEATHER_TOOL], max_tokens=40, temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=150)  # bounded, so a small model cannot write digits forever


def test_structured_output_parse(client, model_name):
    result = client.chat.completions.parse(
        model=model_name, messages=[{"role": "user", "content": "Invent a person."}],
        response_format=Person, max_tokens=60, temperature=0)
    assert isinstance(result.choices[0].message.parsed, Person)


def test_json_object_mode(client, model_name):
    result = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Reply in JSON."}],
        response_format={"type": "json_object"}, max_tokens=60, temperature=0)
    if result.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(result.choices[0].message.content), dict)
    else:
        assert result.choices[0].message.content.lstrip().startswith("{")
