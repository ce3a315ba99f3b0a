"""Hermes and Qwen tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any
number of them, after or between text."""
from __future__ import annotations

from app.parsers.base import ToolParser
from app.parsers.events import Event
from app.parsers.tags import Piece, TagSplitter

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"


class HermesParser(ToolParser):
    name = "hermes"

    def __init__(self) -> None:
        super().__init__()
        self.splitter = TagSplitter(TOOL_OPEN, TOOL_CLOSE)

    def feed(self, text: str) -> list[Event]:
        return self.convert(self.splitter.feed(text), final=False)

    def flush(self) -> list[Event]:
        return self.convert(self.splitter.flush(), final=True)

    def convert(self, pieces: list[Piece], final: bool) -> list[Event]:
        events: list[Event] = []
        for piece in pieces:
            if piece.kind == "outside":
                events += self.text(piece.text)
            elif piece.kind == "open":
                self.start_call()
            elif piece.kind == "inside":
                events += self.calls[-1].add(piece.text)
            else:
                events += self.end_call(TOOL_OPEN, TOOL_CLOSE)
        if final and self.splitter.inside and self.calls and not self.calls[-1].closed:
            events += self.end_call(TOOL_OPEN)  # cut off before its closing tag
        return events


class ForcedCallParser(ToolParser):
    """The whole output is one bare payload, as constrained decoding writes it for
    `tool_choice: "required"` or a named function, whatever the model family."""

    name = "forced"

    def __init__(self) -> None:
        super().__init__()
        self.start_call()

    def feed(self, text: str) -> list[Event]:
        return self.calls[-1].add(text) if self.calls else []

    def flush(self) -> list[Event]:
        return self.end_call() if self.calls and not self.calls[-1].closed else []
