"""Engine logprobs to OpenAI's two formats: chat (`content` entries with bytes and
`top_logprobs`) and completions (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from app.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from workers.engine.outputs import TokenLogprob as EngineLogprob


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-printable-character table used by byte-level BPE."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenTexts:
    """Text and raw bytes of single tokens, cached per token id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def lookup(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            self.cache[token_id] = self.describe(token_id)
        return self.cache[token_id]

    def describe(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
        table = byte_decoder()
        if piece and all(c in table for c in piece):
            raw = bytes(table[c] for c in piece)
        else:
            raw = self.tokenizer.decode([token_id]).encode("utf-8")
        try:
            return raw.decode("utf-8"), list(raw)
        except UnicodeDecodeError:
            # part of a multi-byte character: name the bytes, as OpenAI does
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)

    def text(self, token_id: int) -> str:
        return self.lookup(token_id)[0]


def chat_logprobs(texts: TokenTexts, entries: list[EngineLogprob], top_n: int) -> ChatLogprobs:
    content = []
    for token_id, logprob, top in entries:
        text, raw = texts.lookup(token_id)
        tops = [TopLogprob(token=texts.text(t), logprob=max(lp, -9999.0),
                           bytes=texts.lookup(t)[1]) for t, lp in top[:top_n]]
        content.append(TokenLogprob(token=text, logprob=max(logprob, -9999.0), bytes=raw,
                                    top_logprobs=tops))
    return ChatLogprobs(content=content)


def completion_logprobs(texts: TokenTexts, entries: list[EngineLogprob | None],
                        token_ids: list[int], top_n: int, offset: int) -> CompletionLogprobs:
    """`entries[i]` describes `token_ids[i]`; None (the first prompt token) has no logprob.
    `offset` is where the first token's text starts in the choice's text."""
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries, strict=False):
        text = texts.text(token_id)
        result.tokens.append(text)
        result.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(max(entry[1], -9999.0))
        result.top_logprobs.append({texts.text(t): max(lp, -9999.0) for t, lp in entry[2][:top_n]})
    return result


def merge_completion_logprobs(parts: list[CompletionLogprobs]) -> CompletionLogprobs:
    merged = CompletionLogprobs()
    for part in parts:
        merged.tokens += part.tokens
        merged.text_offset += part.text_offset
        merged.token_logprobs += part.token_logprobs
        merged.top_logprobs += part.top_logprobs
    return merged
