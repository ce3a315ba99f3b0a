"""`<think>...</think>` in the output goes to `reasoning_content`, the rest to `content`."""
from __future__ import annotations

from app.parsers.tags import Piece, TagSplitter
from app.protocol import DeltaMessage

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class ReasoningParser:
    """Streaming: feed text deltas, get content / reasoning deltas in order."""

    def __init__(self) -> None:
        self.splitter = TagSplitter(THINK_OPEN, THINK_CLOSE)
        self.seen_reasoning = False

    def feed(self, text: str) -> list[DeltaMessage]:
        return self.convert(self.splitter.feed(text))

    def flush(self) -> list[DeltaMessage]:
        return self.convert(self.splitter.flush())

    def convert(self, pieces: list[Piece]) -> list[DeltaMessage]:
        deltas = []
        for piece in pieces:
            if piece.kind == "open":
                self.seen_reasoning = True
            elif piece.kind == "inside":
                deltas.append(DeltaMessage(reasoning_content=piece.text))
            elif piece.kind == "outside":
                deltas.append(DeltaMessage(content=piece.text))
        return deltas


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning_content or None when there was no <think> block, content)."""
    parser = ReasoningParser()
    deltas = parser.feed(text) + parser.flush()
    content = "".join(d.content for d in deltas if d.content is not None)
    if not parser.seen_reasoning:
        return None, content
    return "".join(d.reasoning_content for d in deltas if d.reasoning_content is not None), content
