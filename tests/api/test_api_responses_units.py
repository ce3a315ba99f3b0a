"""Responses API pieces without a model: output items and their events, input conversion,
the bounded store."""
from __future__ import annotations

import pytest
from openai.types.responses import Response
from pydantic import ValidationError
from responses_helpers import EVENTS, check_response_stream

from app.errors import APIError
from app.protocol import DeltaMessage, FunctionCallDelta, ToolCallDelta
from app.responses.conversation import chat_request, request_items, to_messages
from app.responses.output import OutputBuilder
from app.responses.protocol import FunctionChoice, ResponseObject, ResponsesRequest, ResponseUsage
from workers.store.response_store import ResponseRecords


def call_header(index: int, name: str) -> DeltaMessage:
    return DeltaMessage(tool_calls=[ToolCallDelta(
        index=index, id=f"call_{index}", type="function",
        function=FunctionCallDelta(name=name, arguments=""))])


def call_args(index: int, fragment: str) -> DeltaMessage:
    return DeltaMessage(tool_calls=[ToolCallDelta(
        index=index, function=FunctionCallDelta(arguments=fragment))])


def as_stream(builder: OutputBuilder, deltas: list[DeltaMessage], status: str) -> list[dict]:
    """Events of a whole stream around the builder's, numbered as the server numbers them."""
    response = ResponseObject(model="m")
    events = [{"type": "response.created", "response": response.wire()},
              {"type": "response.in_progress", "response": response.wire()}]
    for delta in deltas:
        events += builder.feed(delta)
    events += builder.finish(status)
    response.status, response.output = status, builder.items
    response.usage = ResponseUsage.of(3, 4, 0, 0)
    events.append({"type": f"response.{status}", "response": response.wire()})
    numbered = [{**e, "sequence_number": i} for i, e in enumerate(events)]
    for event in numbered:
        EVENTS.validate_python(event)
    return numbered


def test_reasoning_then_text_then_two_calls_are_four_items_in_order():
    builder = OutputBuilder()
    deltas = [DeltaMessage(reasoning_content="think"), DeltaMessage(reasoning_content=" more"),
              DeltaMessage(content="\n\n"), DeltaMessage(content="Calling."),
              call_header(0, "a"), call_args(0, '{"x": '), call_args(0, "1}"),
              DeltaMessage(content="\n"), call_header(1, "b"), call_args(1, "{}")]
    final = check_response_stream(as_stream(builder, deltas, "completed"))
    assert [i["type"] for i in final["output"]] == ["reasoning", "message", "function_call",
                                                    "function_call"]
    reasoning, message, first, second = final["output"]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "think more"}]
    assert message["content"][0]["text"] == "\n\nCalling."
    assert (first["name"], first["arguments"], first["call_id"]) == ("a", '{"x": 1}', "call_0")
    assert (second["name"], second["arguments"]) == ("b", "{}")
    assert Response.model_validate(final).output_text == "\n\nCalling."


def test_whitespace_between_items_is_layout_and_empty_output_is_an_empty_message():
    builder = OutputBuilder()
    as_stream(builder, [DeltaMessage(content="\n"), call_header(0, "a"), call_args(0, "{}"),
                        DeltaMessage(content=" \n")], "completed")
    assert [i.type for i in builder.items] == ["function_call"]
    empty = OutputBuilder()
    final = check_response_stream(as_stream(empty, [], "incomplete"))
    assert final["output"][0]["content"][0]["text"] == ""
    assert final["output"][0]["status"] == "incomplete"


def test_parallel_tool_calls_false_keeps_the_first_call():
    builder = OutputBuilder(parallel_tool_calls=False)
    as_stream(builder, [call_header(0, "a"), call_args(0, "{}"), call_header(1, "b"),
                        call_args(1, "{}")], "completed")
    assert [(i.type, i.name) for i in builder.items] == [("function_call", "a")]


def test_items_become_chat_messages():
    request = ResponsesRequest.model_validate({"instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}",
         "id": "fc_1", "status": "completed"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]})
    messages = to_messages(request.instructions, request_items(request), first_new=0)
    assert [(m.role, m.content) for m in messages] == [
        ("system", "Be brief."), ("user", "Weather?"), ("assistant", "Checking."),
        ("tool", "sunny")]
    assert messages[2].tool_calls[0].id == "c1" and messages[3].tool_call_id == "c1"


@pytest.mark.parametrize(("item", "param"), [
    ({"type": "input_image_call"}, "input.1.type"),
    ({"role": "user", "content": [{"type": "input_image", "image_url": "x"}]},
     "input.1.content.0.type"),
])
def test_unsupported_input_is_a_400_naming_it(item, param):
    request = ResponsesRequest.model_validate({"input": [{"role": "user", "content": "hi"},
                                                         item]})
    with pytest.raises(APIError) as error:
        to_messages(None, request_items(request), first_new=0)
    assert (error.value.status, error.value.param) == (400, param)


@pytest.mark.parametrize("item", [1, "x", {"type": ["message"]}, {"type": None}, {"role": "x"}])
def test_malformed_items_fail_validation(item):
    with pytest.raises(ValidationError):
        ResponsesRequest.model_validate({"input": [item]})


def test_text_format_and_tool_choice_map_to_chat():
    request = ResponsesRequest.model_validate({
        "input": "x", "max_output_tokens": 9,
        "text": {"format": {"type": "json_schema", "name": "city", "strict": True,
                            "schema": {"type": "object"}}},
        "tools": [{"type": "function", "name": "w", "parameters": {"type": "object"}}]})
    chat = chat_request(request, to_messages(None, request_items(request), 0))
    assert chat.response_format.json_schema.json_schema == {"type": "object"}
    assert chat.max_completion_tokens == 9 and chat.tools[0].function.name == "w"
    assert chat.tool_choice == "auto"
    forced = request.model_copy(update={"tool_choice": FunctionChoice(name="w")})
    with pytest.raises(APIError, match="text.format"):
        chat_request(forced, [])
    with pytest.raises(ValidationError):
        ResponsesRequest.model_validate({"input": "x", "max_output_tokens": 0})


def test_records_evict_least_recently_used_by_count_and_size():
    records = ResponseRecords(max_records=2, max_bytes=10)
    records.put("a", "111")
    records.put("b", "222")
    assert records.get("a") == "111"  # a is now the most recent
    records.put("c", "333")
    assert (records.get("b"), len(records)) == (None, 2)
    records.put("d", "4444")
    assert records.get("a") is None and records.size == 7  # 3 + 4 + 3 > 10 evicted a
    records.put("huge", "x" * 11)
    assert records.get("huge") is None and len(records) == 2
    assert records.delete("c") and not records.delete("c") and records.size == 4
