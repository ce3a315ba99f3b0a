"""Incremental detokenization and stop-string handling for one sequence.

With a `tokenizers` backend, the Rust DecodeStream decodes each token in one call (~2 us,
7x less than decoding a window twice in Python: it runs for every sequence every step).
Otherwise text is decoded over a short window of recent tokens. Either way a delta is
released only when it does not end in an incomplete UTF-8 character. When stop strings are
set, the last `max(len(stop)) - 1` characters are held back so a stop string split across
tokens is never emitted.

A request without stop strings needs no text to decide when it ends, so its text is decoded
only when an output's `text` is read (`defer`, then `claim` per output): the engine loop does
no text work for it, the reader (an event loop, a front end) does.
"""
from __future__ import annotations

import threading

from tokenizers.decoders import DecodeStream

REPLACEMENT = "\ufffd"
# (detokenizer, begin, end): an output's text, source[begin:end] decoded when first read
DeferredText = tuple["Detokenizer", int, int]


class Detokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_token_ids[-6:])  # context so leading spaces decode right
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # output text so far (truncated at a stop string)
        self.emitted = 0  # characters of self.text already returned
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = backend
        self.stream = None if backend is None else \
            DecodeStream(self.ids, skip_special_tokens=skip_special_tokens)
        self.source: list[int] | None = None  # deferred: the token list decoded on read
        self.claimed = 0  # deferred: tokens of `source` handed to outputs so far
        self.ends: list[int] = []  # deferred: len(text) after each decoded token, from `base`
        self.base = 0
        self.lock = threading.Lock()  # deferred text is decoded on the reader's thread

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append a token; returns the matched stop string if one now appears in the text."""
        new = self._step(token_id)
        if not new:
            return None  # wait for the rest of a multi-byte character
        start = max(0, len(self.text) - self.hold)
        self.text += new
        if not check_stop:
            return None
        matches = [(idx, stop) for stop in self.stop if (idx := self.text.find(stop, start)) != -1]
        if not matches:
            return None
        idx, stop = min(matches)
        self.text = self.text[:idx]
        return stop

    def _step(self, token_id: int) -> str | None:
        """The text token_id completes, if any."""
        if self.stream is not None and self.backend is not None:
            return self.stream.step(self.backend, token_id)
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return None
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def defer(self, token_ids: list[int]) -> None:
        """Decode token_ids past their current length only when an output's text is read
        (stop strings need the text at once, so only without them)."""
        assert not self.stop, "stop strings are checked on the text as tokens arrive"
        self.source = token_ids
        self.base = self.claimed = len(token_ids)
        self.ends = [self.emitted]

    def claim(self, end: int) -> DeferredText | None:
        """source[claimed:end] for one output, decoded when read; None when it adds none."""
        begin = self.claimed
        if end <= begin:
            return None
        self.claimed = end
        return (self, begin, end)

    def text_between(self, begin: int, end: int) -> str:
        """The text released by source[begin:end] (positions claimed by one output)."""
        with self.lock:
            assert self.source is not None, "text_between needs defer first"
            ends = self.ends
            for i in range(self.base + len(ends) - 1, end):
                new = self._step(self.source[i])
                if new:
                    self.text += new
                ends.append(len(self.text))
            self.emitted = ends[-1]
            return self.text[ends[begin - self.base]:ends[end - self.base]]

    def skip(self, num_chars: int) -> None:
        """Count the first num_chars of the text as already returned."""
        self.emitted = min(num_chars, len(self.text))

    def take(self, finished: bool) -> str:
        """The text not yet returned, holding back a possible stop-string prefix unless finished."""
        end = len(self.text) if finished or not self.stop else max(self.emitted,
                                                                    len(self.text) - self.hold)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
