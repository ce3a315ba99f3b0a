"""`<think>` blocks to reasoning, whole and streamed, also when the prompt opened the block."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from app.parsers.events import Reasoning, Text
from app.parsers.reasoning import ThinkParser, opens_reasoning, split_reasoning
from app.parsers.tags import TagSplitter, partial_tag_length

TEXT = "<think>The user wants 2+2. That is 4.</think>\n\nThe answer is 4."
OPENED = "The user wants 2+2. That is 4.\n</think>\n\nThe answer is 4."  # after "<think>\n"


def split(text: str, starts_inside: bool = False) -> tuple[str | None, str]:
    return split_reasoning(ThinkParser(starts_inside), text)


def test_split_whole_text():
    assert split(TEXT) == ("The user wants 2+2. That is 4.", "\n\nThe answer is 4.")


def test_no_think_block_means_no_reasoning():
    assert split("plain <thin answer") == (None, "plain <thin answer")


def test_unfinished_think_block_is_all_reasoning():
    assert split("<think>still going") == ("still going", "")


def test_block_opened_by_the_prompt():
    assert split(OPENED, starts_inside=True) == ("The user wants 2+2. That is 4.\n",
                                                 "\n\nThe answer is 4.")
    assert split("cut off while thinking", starts_inside=True) == ("cut off while thinking", "")


def test_prompt_opens_reasoning_only_when_its_last_block_is_unclosed():
    assert opens_reasoning("<｜Assistant｜><think>\n")
    assert not opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not opens_reasoning("<|im_start|>assistant\n")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(TEXT)), max_size=20), st.booleans())
def test_streaming_matches_whole_text_for_any_split(cuts, opened):
    text = OPENED if opened else TEXT
    parser, events, start = ThinkParser(opened), [], 0
    for cut in sorted({c for c in cuts if c <= len(text)}) + [len(text)]:
        events += parser.feed(text[start:cut])
        start = cut
    events += parser.flush()
    reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
    content = "".join(e.text for e in events if isinstance(e, Text))
    assert (reasoning, content) == split(text, opened)
    assert all(e.text for e in events)


def test_partial_tag_is_held_back_until_decided():
    splitter = TagSplitter("<think>", "</think>")
    assert [p.text for p in splitter.feed("hello <thi")] == ["hello "]
    assert [p.kind for p in splitter.feed("nk>x")] == ["open", "inside"]
    assert partial_tag_length("abc</th", "</think>") == 4
    assert partial_tag_length("abc", "</think>") == 0
