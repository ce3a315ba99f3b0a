"""Wire models, SSE framing, error mapping and parameter checks, without an engine."""
from __future__ import annotations

import json
import pickle

import pytest
from pydantic import ValidationError

from app.errors import APIError, to_api_error
from app.params import Limits, chat_schema, sampling_params
from app.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    CompletionRequest,
    DeltaMessage,
    FunctionCallDelta,
    ToolCallDelta,
)
from app.streaming import DONE, ChatChunks, CompletionChunks
from workers.engine.errors import ContextLengthError, InvalidRequestError, QueueFullError

LIMITS = Limits(max_model_len=100, vocab_size=1000, max_n=4)
MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields})


def params_of(request, max_tokens=None, logprobs=None, schema=None):
    return sampling_params(request, limits=LIMITS, max_tokens=max_tokens, logprobs=logprobs,
                           json_schema=schema)


def test_unknown_fields_are_ignored():
    request = chat(frobnicate=True, user="u1", metadata={"a": 1})
    assert not hasattr(request, "frobnicate") and request.user == "u1"


def test_content_parts_and_stop_forms():
    request = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}]}],
                   stop="x")
    assert request.messages[0].content[0].text == "a" and request.stop == "x"
    assert CompletionRequest.model_validate({"prompt": [[1, 2], [3]]}).prompt == [[1, 2], [3]]
    assert CompletionRequest.model_validate({"prompt": [1, 2]}).prompt == [1, 2]


def test_delta_leaves_out_unset_fields():
    assert DeltaMessage(content="a").model_dump() == {"content": "a"}
    assert DeltaMessage().model_dump() == {}
    call = ToolCallDelta(index=0, function=FunctionCallDelta(arguments="{"))
    assert call.model_dump() == {"index": 0, "function": {"arguments": "{"}}


def test_assistant_message_keeps_null_content():
    data = AssistantMessage(content=None).model_dump()
    assert data == {"role": "assistant", "content": None, "refusal": None}


def test_chat_chunks_frame_and_share_id():
    chunks = ChatChunks("chatcmpl-1", 123, "m")
    events = [chunks.role(0), chunks.delta(0, DeltaMessage(content="hi")),
              chunks.finish(0, "stop")]
    for text in events:
        assert text.startswith("data: ") and text.endswith("\n\n") and text.count("\n") == 2
    role, delta, finish = (json.loads(e[6:]) for e in events)
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert delta["choices"][0] == {"index": 0, "delta": {"content": "hi"}, "logprobs": None,
                                   "finish_reason": None}
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "stop"
    assert {(e["id"], e["created"], e["usage"]) for e in (role, delta, finish)} == \
        {("chatcmpl-1", 123, None)}
    assert DONE == "data: [DONE]\n\n"


def test_completion_chunks():
    event = json.loads(CompletionChunks("cmpl-1", 5, "m").text(1, "ab")[6:])
    assert event["object"] == "text_completion" and event["usage"] is None
    assert event["choices"] == [{"index": 1, "text": "ab", "logprobs": None,
                                 "finish_reason": None}]


@pytest.mark.parametrize("exc, status, param", [
    (InvalidRequestError("bad", param="top_p"), 400, "top_p"),
    (ContextLengthError(10, 20, what="messages"), 400, "messages"),
    (QueueFullError("full"), 503, None),
    (json.JSONDecodeError("Expecting value", "x", 0), 400, None),
    (RuntimeError("secret detail"), 500, None),
])
def test_error_mapping(exc, status, param):
    error = to_api_error(exc, retry_after_s=3)
    body = error.body()
    assert error.status == status and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param
    assert "secret" not in body["error"]["message"]
    if status == 503:
        assert error.headers == {"Retry-After": "3"}


def test_validation_error_is_readable():
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"messages": "nope"})
    error = to_api_error(info.value)
    assert error.status == 400 and error.param == "messages"
    assert "errors.pydantic.dev" not in error.message and "messages" in error.message


@pytest.mark.parametrize("fields, param", [
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 5}, "n"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_sampling_values(fields, param):
    with pytest.raises((APIError, InvalidRequestError)) as info:
        params_of(chat(**fields))
    assert info.value.param == param


def test_context_errors_name_the_numbers_and_the_prompt():
    error = ContextLengthError(100, 120, what="messages")
    assert error.param == "messages" and "100 tokens. However, your messages resulted in 120 " \
        "tokens" in error.message
    error = pickle.loads(pickle.dumps(ContextLengthError(100, 30, 100))).named("messages")
    assert error.param == "max_tokens"
    assert "130 tokens (30 in the messages, 100 in the completion)" in error.message


def test_forced_tool_choice_becomes_a_schema():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}}}},
             {"type": "function", "function": {"name": "g"}}]
    named = chat_schema(chat(tools=tools, tool_choice={"type": "function",
                                                       "function": {"name": "f"}}))
    assert named["properties"]["name"] == {"type": "string", "enum": ["f"]}
    assert list(named["properties"]) == ["name", "arguments"]
    required = chat_schema(chat(tools=tools, tool_choice="required"))
    assert len(required["anyOf"]) == 2
    assert chat_schema(chat(tools=tools, tool_choice="auto")) is None
    with pytest.raises(APIError):
        chat_schema(chat(tools=tools, tool_choice={"type": "function",
                                                   "function": {"name": "nope"}}))


def test_response_format_schema():
    assert chat_schema(chat(response_format={"type": "json_object"})) == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    request = chat(response_format={"type": "json_schema",
                                    "json_schema": {"name": "x", "schema": schema}})
    assert chat_schema(request) == schema
    with pytest.raises(APIError):
        params_of(chat(), schema={"type": "nonsense"})
