"""Streamed text split around an open/close tag pair; a tag cut between two deltas still
matches, because a tail that could start the next tag is held back until it is decided."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    kind: str  # "outside" | "inside" text, or "open" | "close" for a tag boundary
    text: str = ""


def partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class TagSplitter:
    def __init__(self, open_tag: str, close_tag: str, inside: bool = False) -> None:
        self.open_tag = open_tag
        self.close_tag = close_tag
        self.inside = inside
        self.buffer = ""

    def feed(self, text: str) -> list[Piece]:
        self.buffer += text
        pieces: list[Piece] = []
        while True:
            tag = self.close_tag if self.inside else self.open_tag
            kind = "inside" if self.inside else "outside"
            pos = self.buffer.find(tag)
            if pos < 0:
                held = partial_tag_length(self.buffer, tag)
                ready = self.buffer[:len(self.buffer) - held]
                if ready:
                    pieces.append(Piece(kind, ready))
                self.buffer = self.buffer[len(ready):]
                return pieces
            if pos:
                pieces.append(Piece(kind, self.buffer[:pos]))
            pieces.append(Piece("close" if self.inside else "open"))
            self.buffer = self.buffer[pos + len(tag):]
            self.inside = not self.inside

    def flush(self) -> list[Piece]:
        """Whatever is held back, once no more text will come."""
        text, self.buffer = self.buffer, ""
        return [Piece("inside" if self.inside else "outside", text)] if text else []
