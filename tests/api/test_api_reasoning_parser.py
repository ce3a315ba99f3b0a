"""`<think>` blocks to reasoning_content, whole and streamed."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from app.parsers.reasoning_parser import ReasoningParser, split_reasoning
from app.parsers.tags import TagSplitter, partial_tag_length

TEXT = "<think>The user wants 2+2. That is 4.</think>\n\nThe answer is 4."


def test_split_whole_text():
    assert split_reasoning(TEXT) == ("The user wants 2+2. That is 4.", "\n\nThe answer is 4.")


def test_no_think_block_means_no_reasoning():
    assert split_reasoning("plain <thin answer") == (None, "plain <thin answer")


def test_unfinished_think_block_is_all_reasoning():
    assert split_reasoning("<think>still going") == ("still going", "")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(TEXT)), max_size=20))
def test_streaming_matches_whole_text_for_any_split(cuts):
    parser, deltas, start = ReasoningParser(), [], 0
    for cut in sorted(set(cuts)) + [len(TEXT)]:
        deltas += parser.feed(TEXT[start:cut])
        start = cut
    deltas += parser.flush()
    reasoning = "".join(d.reasoning_content or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert (reasoning, content) == split_reasoning(TEXT)
    assert all((d.content is None) != (d.reasoning_content is None) for d in deltas)


def test_partial_tag_is_held_back_until_decided():
    splitter = TagSplitter("<think>", "</think>")
    assert [p.text for p in splitter.feed("hello <thi")] == ["hello "]
    assert [p.kind for p in splitter.feed("nk>x")] == ["open", "inside"]
    assert partial_tag_length("abc</th", "</think>") == 4
    assert partial_tag_length("abc", "</think>") == 0
