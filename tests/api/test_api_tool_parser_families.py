"""Llama 3.x JSON and Mistral tool calls, whole and streamed with the text cut anywhere."""
from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from parser_helpers import assemble, check_stream_matches_whole, stream, whole

from app.parsers.llama3 import Llama3JsonParser
from app.parsers.mistral import MistralParser

WEATHER = {"city": "Paris", "days": [1, 2], "unit": {"name": "celsius", "note": "a } and \" ;"}}
WEATHER_CALL = {"name": "get_weather", "arguments": json.dumps(WEATHER)}
TIME_CALL = {"name": "get_time", "arguments": "{}"}


def llama(name: str, args: dict) -> str:
    return json.dumps({"name": name, "parameters": args})


def mistral(name: str, args: dict, call_id: str | None = None) -> str:
    return json.dumps({"name": name, "arguments": args} | ({"id": call_id} if call_id else {}))


LLAMA = {
    "bare": (llama("get_weather", WEATHER), None, [WEATHER_CALL]),
    "python_tag": ("<|python_tag|>" + llama("get_weather", WEATHER), None, [WEATHER_CALL]),
    "semicolons": (f'<|python_tag|>{llama("get_weather", WEATHER)}; {llama("get_time", {})}',
                   None, [WEATHER_CALL, TIME_CALL]),
    "lines": (f'{llama("get_weather", WEATHER)}\n{llama("get_time", {})}', None,
              [WEATHER_CALL, TIME_CALL]),
    "after_text": (f'Let me look.\n\n{llama("get_weather", WEATHER)}', "Let me look.",
                   [WEATHER_CALL]),
    "tag_after_text": (f'Let me look. <|python_tag|>{llama("get_time", {})}', "Let me look.",
                       [TIME_CALL]),
    "arguments_key": (json.dumps({"name": "get_weather", "arguments": WEATHER}), None,
                      [WEATHER_CALL]),
}
MISTRAL = {
    "list": (f'[TOOL_CALLS][{mistral("get_weather", WEATHER)}]', None, [WEATHER_CALL]),
    "ids": ((f'[TOOL_CALLS] [{mistral("get_weather", WEATHER, "a1B2c3D4e")}, '
             f'{mistral("get_time", {}, "Zz9Yy8Xx7")}]'), None, [WEATHER_CALL, TIME_CALL]),
    "after_text": (f'Let me look. [TOOL_CALLS][{mistral("get_time", {})}]', "Let me look.",
                   [TIME_CALL]),
    "args_marker": ((f'[TOOL_CALLS]get_weather[ARGS]{json.dumps(WEATHER)}'
                     f'[TOOL_CALLS]get_time[ARGS]{{}}'), None, [WEATHER_CALL, TIME_CALL]),
}
PARSERS = {"llama": (Llama3JsonParser, LLAMA), "mistral": (MistralParser, MISTRAL)}
CASES = [(family, case) for family, (_, cases) in PARSERS.items() for case in cases]


@pytest.mark.parametrize("family,case", CASES)
def test_whole_output(family, case):
    parser, cases = PARSERS[family]
    text, content, calls = cases[case]
    assert whole(parser(), text) == (content, calls)


@pytest.mark.parametrize("family,case", CASES)
def test_streamed_token_by_token(family, case):
    parser, cases = PARSERS[family]
    text, content, calls = cases[case]
    streamed_content, streamed_calls = assemble(stream(parser(), text, list(range(len(text)))))
    assert streamed_calls == calls and streamed_content.strip() == (content or "")


def test_mistral_call_id_is_kept():
    text = '[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{"zone": "UTC"}'
    [event, *_] = MistralParser().feed(text)
    assert (event.id, event.name) == ("a1B2c3D4e", "get_time")


@pytest.mark.parametrize("parser,text", [
    (Llama3JsonParser, '{"name": "get_weather", "parameters": {"city": "Pa'),  # truncated
    (Llama3JsonParser, '{"name": "get_weather", "parameters": {"city": }}'),  # malformed
    (Llama3JsonParser, '{"city": "Paris"}'),  # an object, not a call
    (Llama3JsonParser, 'JSON looks like {"name": "x", "parameters": {}} mid-sentence'),
    (Llama3JsonParser, "<|python_tag|>brave_search.call(query='x')"),
    (Llama3JsonParser, '<|python_tag|>{"parameters": {}}'),
    (MistralParser, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Pa'),
    (MistralParser, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": ]}]'),
    (MistralParser, '[TOOL_CALLS] I cannot call tools.'),
    (MistralParser, '[TOOL_CALLS]get_weather[ARGS]{"city": "Pa'),
    (MistralParser, "[TOOL_CALLS]get weather[ARGS]{}"),
    (MistralParser, "[TOOL_CALL"),
])
def test_malformed_or_truncated_calls_are_content(parser, text):
    assert whole(parser(), text) == (text, [])


def test_llama_object_without_name_streams_as_content():
    text = 'Here:\n{"city": "Paris"}\ndone'
    assert assemble(stream(Llama3JsonParser(), text, [7, 8, 9])) == (text, [])


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(CASES), st.lists(st.integers(min_value=0, max_value=200), max_size=25))
def test_streaming_matches_whole_output_for_any_split(case, cuts):
    parser, cases = PARSERS[case[0]]
    check_stream_matches_whole(parser, cases[case[1]][0], cuts)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["llama", "mistral"]),
       st.text(alphabet='{}[]":;, \nnameparg_TOOLCS|pyth<>', max_size=60),
       st.lists(st.integers(min_value=0, max_value=60), max_size=10))
@example(family="llama", text="<|python_tag|>", cuts=[])
@example(family="mistral", text="[TOOL_CALLS][", cuts=[])
def test_text_without_a_complete_call_survives_streaming(family, text, cuts):
    parser = PARSERS[family][0]
    check_stream_matches_whole(parser, text, cuts)
