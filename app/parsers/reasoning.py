"""`<think>...</think>` reasoning (DeepSeek-R1 and its distills, Qwen3, QwQ) to reasoning events,
the rest to content.

Some templates open the block in the prompt (DeepSeek-R1's ends with `<think>\\n`): then the
output starts inside it, and everything up to `</think>` is reasoning.
"""
from __future__ import annotations

from app.parsers.events import Event, Reasoning, Text
from app.parsers.tags import Piece, TagSplitter

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def opens_reasoning(prompt: str) -> bool:
    """The prompt ends inside an unclosed `<think>` block."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


class ThinkParser:
    name = "think"

    def __init__(self, starts_inside: bool = False) -> None:
        self.splitter = TagSplitter(THINK_OPEN, THINK_CLOSE, inside=starts_inside)
        self.seen_reasoning = starts_inside

    def feed(self, text: str) -> list[Event]:
        return self.convert(self.splitter.feed(text))

    def flush(self) -> list[Event]:
        return self.convert(self.splitter.flush())

    def convert(self, pieces: list[Piece]) -> list[Event]:
        events: list[Event] = []
        for piece in pieces:
            if piece.kind == "open":
                self.seen_reasoning = True
            elif piece.kind == "inside":
                events.append(Reasoning(piece.text))
            elif piece.kind == "outside":
                events.append(Text(piece.text))
        return events


def split_reasoning(parser: ThinkParser, text: str) -> tuple[str | None, str]:
    """(reasoning, or None when the output had no reasoning block; content)."""
    events = parser.feed(text) + parser.flush()
    content = "".join(e.text for e in events if isinstance(e, Text))
    if not parser.seen_reasoning:
        return None, content
    return "".join(e.text for e in events if isinstance(e, Reasoning)), content
