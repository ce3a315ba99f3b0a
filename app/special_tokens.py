"""Special-token text sent by a client stays text: only the chat template's own markers become
special tokens, so no message, tool definition or tool call can forge a turn.

Every client string is masked before rendering: each special-token text in it becomes a marker,
a word unique to the request that templates pass through unchanged. The rendered text then
holds special-token text only where the template wrote it; it is split there, and the text in
between is tokenized with special-token parsing off once the markers are put back.
"""
from __future__ import annotations

import re
import secrets
from typing import Any


class SpecialTokens:
    """The tokenizer's special tokens, and tokenization that parses only the template's."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        texts = sorted(self.ids, key=len, reverse=True)  # longest first: "<|ab|>" before "<|a"
        self.pattern = re.compile("|".join(map(re.escape, texts))) if texts else None

    def masker(self) -> Masker:
        return Masker(self.pattern)

    def encode(self, text: str, masker: Masker) -> list[int]:
        """Token ids of rendered text whose client strings went through `masker`."""
        if not masker.originals or self.pattern is None:  # nothing masked: the usual ids
            return self.tokenizer.encode(text, add_special_tokens=False)
        ids: list[int] = []
        start = 0
        for match in self.pattern.finditer(text):
            ids += self.plain(masker.unmask(text[start:match.start()]))
            ids.append(self.ids[match.group(0)])
            start = match.end()
        return ids + self.plain(masker.unmask(text[start:]))

    def plain(self, text: str) -> list[int]:
        if not text:
            return []
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


class Masker:
    """One request's masking: special-token text in client strings <-> markers."""

    def __init__(self, pattern: re.Pattern | None) -> None:
        self.pattern = pattern
        self.prefix = f"SPECIAL{secrets.token_hex(8)}N"
        self.markers = re.compile(rf"{self.prefix}(\d+)X")
        self.originals: list[str] = []

    def mask(self, value: Any) -> Any:
        """`value` with the special-token text in each of its strings (keys too) masked."""
        if self.pattern is None:
            return value
        if isinstance(value, str):
            return self.pattern.sub(self.marker, value)
        if isinstance(value, dict):
            return {self.mask(k): self.mask(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.mask(v) for v in value]
        return value

    def marker(self, match: re.Match) -> str:
        self.originals.append(match.group(0))
        return f"{self.prefix}{len(self.originals) - 1}X"

    def unmask(self, text: str) -> str:
        if not self.originals:
            return text
        return self.markers.sub(lambda m: self.originals[int(m.group(1))], text)
