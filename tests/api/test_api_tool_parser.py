"""Hermes tool-call parsing, whole and streamed with the text cut at arbitrary points."""
from __future__ import annotations

import json

from hypothesis import example, given, settings
from hypothesis import strategies as st

from app.parsers.json_scan import scan_payload
from app.parsers.tool_parser import ToolParser, parse_tool_calls

WEATHER = {"city": "Paris", "days": [1, 2], "unit": {"name": "celsius", "note": "a } and \" "}}
TEXT = ("Let me check. <tool_call>\n"
        + json.dumps({"name": "get_weather", "arguments": WEATHER})
        + "\n</tool_call>\n<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>")


def stream(text: str, cuts: list[int], forced: bool = False) -> list[dict]:
    parser = ToolParser(forced=forced)
    deltas, start = [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        deltas += parser.feed(text[start:cut])
        start = cut
    deltas += parser.flush()
    return [d.model_dump() for d in deltas]


def assemble(deltas: list[dict]) -> tuple[str, list[dict]]:
    content, calls = "", {}
    for delta in deltas:
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            if call["index"] not in calls:
                assert call["id"].startswith("call_") and call["type"] == "function"
                assert call["function"]["arguments"] == ""
                calls[call["index"]] = {"name": call["function"]["name"], "arguments": ""}
            else:
                assert set(call) == {"index", "function"}
                calls[call["index"]]["arguments"] += call["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


def test_whole_text():
    content, calls = parse_tool_calls(TEXT)
    assert content == "Let me check."
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == WEATHER
    assert json.loads(calls[1].function.arguments) == {}
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")


def test_text_without_calls_is_content():
    assert parse_tool_calls("just words <tool") == ("just words <tool", [])


def test_malformed_call_leaves_everything_as_content():
    text = 'a <tool_call>{"name": "f", "arguments": {"x": </tool_call>'
    assert parse_tool_calls(text) == (text, [])


def test_arguments_as_json_string():
    text = '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
    _, calls = parse_tool_calls(text)
    assert json.loads(calls[0].function.arguments) == {"x": 1}


def test_call_without_arguments_gets_empty_object():
    _, calls = parse_tool_calls('<tool_call>{"name": "ping"}</tool_call>')
    assert calls[0].function.arguments == "{}"


def test_forced_payload_without_tags():
    payload = json.dumps({"name": "get_weather", "arguments": WEATHER})
    content, calls = parse_tool_calls(payload, forced=True)
    assert content is None and json.loads(calls[0].function.arguments) == WEATHER


def test_arguments_before_name_stream_once_name_is_known():
    payload = '{"arguments": {"x": [1, 2]}, "name": "f"}'
    deltas = stream(payload, list(range(len(payload))), forced=True)
    content, calls = assemble(deltas)
    assert content == "" and calls == [{"name": "f", "arguments": '{"x": [1, 2]}'}]


def test_arguments_stream_before_the_call_closes():
    parser = ToolParser()
    deltas = parser.feed('<tool_call>{"name": "f", "arguments": {"city": "Pa')
    _, calls = assemble([d.model_dump() for d in deltas])
    assert calls == [{"name": "f", "arguments": '{"city": "Pa'}]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(TEXT)), max_size=30))
def test_streaming_matches_whole_text_for_any_split(cuts):
    content, calls = assemble(stream(TEXT, cuts))
    whole_content, whole_calls = parse_tool_calls(TEXT)
    assert content.strip() == whole_content
    assert calls == [{"name": c.function.name, "arguments": c.function.arguments}
                     for c in whole_calls]


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="<>/_toolcaxyz {}\"", max_size=60),
       st.lists(st.integers(min_value=0, max_value=60), max_size=10))
@example(text="<tool_call>", cuts=[])  # an unclosed call at the end of the output
def test_text_without_a_complete_call_survives_streaming(text, cuts):
    cuts = [c for c in cuts if c <= len(text)]
    content, calls = assemble(stream(text, cuts))
    if not calls:
        assert content == text


def test_scan_of_unfinished_payload():
    scan = scan_payload('{"name": "f", "arguments": {"a": "}')
    assert scan.name == "f" and scan.args_end is None and not scan.complete
    scan = scan_payload('{"name": "f", "arguments": {"a": 1}}')
    assert scan.complete and scan.args_end == len('{"name": "f", "arguments": {"a": 1}')
