"""Feeding parsers text cut at arbitrary points, and assembling their events as a client does."""
from __future__ import annotations

from app.parsers.base import ToolParser, parse_whole
from app.parsers.events import CallArguments, CallStart, Event, Text


def stream(parser: ToolParser, text: str, cuts: list[int]) -> list[Event]:
    events, start = [], 0
    for cut in sorted({c for c in cuts if 0 <= c <= len(text)}) + [len(text)]:
        events += parser.feed(text[start:cut])
        start = cut
    return events + parser.flush()


def assemble(events: list[Event]) -> tuple[str, list[dict]]:
    """(content, [{"name", "arguments"}]) checking OpenAI's order: a call's header first, with
    its id, then argument fragments."""
    content, calls, ids = "", {}, set()
    for event in events:
        if isinstance(event, Text):
            content += event.text
        elif isinstance(event, CallStart):
            assert event.index not in calls and event.index == len(calls)
            assert event.id and event.id not in ids and event.name
            ids.add(event.id)
            calls[event.index] = {"name": event.name, "arguments": ""}
        else:
            assert isinstance(event, CallArguments) and event.index in calls and event.fragment
            calls[event.index]["arguments"] += event.fragment
    return content, [calls[i] for i in sorted(calls)]


def whole(parser: ToolParser, text: str) -> tuple[str | None, list[dict]]:
    content, calls = parse_whole(parser, text)
    return content, [{"name": c.name, "arguments": c.arguments} for c in calls]


def check_stream_matches_whole(make, text: str, cuts: list[int]) -> None:
    """Streamed with any cuts, the calls are the whole parse's and the content only differs
    in surrounding whitespace; where the whole parse finds no call, the text comes back."""
    content, calls = assemble(stream(make(), text, cuts))
    whole_content, whole_calls = whole(make(), text)
    if whole_calls:
        assert calls == whole_calls
        assert content.strip() == (whole_content or "")
    elif not calls:
        assert content == text
