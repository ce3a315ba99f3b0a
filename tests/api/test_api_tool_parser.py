"""Hermes (and Qwen) tool-call parsing, whole and streamed with the text cut at arbitrary points;
forced calls (a bare payload), the same for every family."""
from __future__ import annotations

import json

from hypothesis import example, given, settings
from hypothesis import strategies as st
from parser_helpers import assemble, check_stream_matches_whole, stream, whole

from app.parsers.base import parse_whole
from app.parsers.hermes import ForcedCallParser, HermesParser
from app.parsers.json_scan import scan_payload

WEATHER = {"city": "Paris", "days": [1, 2], "unit": {"name": "celsius", "note": "a } and \" "}}
TEXT = ("Let me check. <tool_call>\n"
        + json.dumps({"name": "get_weather", "arguments": WEATHER})
        + "\n</tool_call>\n<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>")


def test_whole_text():
    content, calls = parse_whole(HermesParser(), TEXT)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == WEATHER
    assert json.loads(calls[1].arguments) == {}
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")


def test_text_without_calls_is_content():
    assert whole(HermesParser(), "just words <tool") == ("just words <tool", [])


def test_malformed_call_leaves_everything_as_content():
    text = 'a <tool_call>{"name": "f", "arguments": {"x": </tool_call>'
    assert whole(HermesParser(), text) == (text, [])


def test_truncated_call_leaves_everything_as_content():
    text = 'a <tool_call>{"name": "f", "arguments": {"x": 1'
    assert whole(HermesParser(), text) == (text, [])


def test_arguments_as_json_string():
    text = '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
    _, calls = whole(HermesParser(), text)
    assert json.loads(calls[0]["arguments"]) == {"x": 1}


def test_call_without_arguments_gets_empty_object():
    _, calls = whole(HermesParser(), '<tool_call>{"name": "ping"}</tool_call>')
    assert calls[0]["arguments"] == "{}"


def test_forced_payload_without_tags():
    payload = json.dumps({"name": "get_weather", "arguments": WEATHER})
    content, calls = whole(ForcedCallParser(), payload)
    assert content is None and json.loads(calls[0]["arguments"]) == WEATHER


def test_arguments_before_name_stream_once_name_is_known():
    payload = '{"arguments": {"x": [1, 2]}, "name": "f"}'
    content, calls = assemble(stream(ForcedCallParser(), payload, list(range(len(payload)))))
    assert content == "" and calls == [{"name": "f", "arguments": '{"x": [1, 2]}'}]


def test_arguments_stream_before_the_call_closes():
    events = HermesParser().feed('<tool_call>{"name": "f", "arguments": {"city": "Pa')
    assert assemble(events)[1] == [{"name": "f", "arguments": '{"city": "Pa'}]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(TEXT)), max_size=30))
def test_streaming_matches_whole_text_for_any_split(cuts):
    check_stream_matches_whole(HermesParser, TEXT, cuts)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="<>/_toolcaxyz {}\"", max_size=60),
       st.lists(st.integers(min_value=0, max_value=60), max_size=10))
@example(text="<tool_call>", cuts=[])  # an unclosed call at the end of the output
def test_text_without_a_complete_call_survives_streaming(text, cuts):
    content, calls = assemble(stream(HermesParser(), text, cuts))
    if not calls:
        assert content == text


def test_scan_of_unfinished_payload():
    scan = scan_payload('{"name": "f", "arguments": {"a": "}')
    assert scan.name == "f" and scan.args_end is None and not scan.complete
    scan = scan_payload('{"name": "f", "arguments": {"a": 1}}')
    assert scan.complete and scan.args_end == len('{"name": "f", "arguments": {"a": 1}')
