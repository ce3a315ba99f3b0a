"""What the engine hands back to callers, one delta per request per step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.engine.detokenizer import DeferredText

# One entry per sampled token: (token_id, logprob, [(top_token_id, top_logprob), ...]).
TokenLogprob = tuple[int, float, list[tuple[int, float]]]


@dataclass
class RequestOutput:
    """The new part of one request's generation since the previous output.

    `text` and `token_ids` are deltas; `finish_reason` is set on the last output
    ("stop", "length" or "abort"); usage counts are totals so far. With `deferred_text` the
    text is decoded when `text` is first read (on the reader's thread, not the engine's).
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    deferred_text: DeferredText | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        """Pickled (to another process) with its text decoded."""
        return {**self.__dict__, "_text": self.text, "deferred_text": None}

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merge(self, later: RequestOutput) -> RequestOutput:
        """This delta followed by `later`, as one delta of the same request."""
        logprobs = None if self.logprobs is None and later.logprobs is None else \
            (self.logprobs or []) + (later.logprobs or [])
        return RequestOutput(
            request_id=self.request_id, text=self.text + later.text,
            token_ids=self.token_ids + later.token_ids, logprobs=logprobs,
            finish_reason=later.finish_reason,
            prompt_tokens=later.prompt_tokens, completion_tokens=later.completion_tokens,
            cached_tokens=later.cached_tokens,
            prompt_logprobs=self.prompt_logprobs or later.prompt_logprobs)


def _get_text(self: RequestOutput) -> str:
    state = self.__dict__  # "_text" is no dataclass field: the property stands for it
    if state["deferred_text"] is not None:
        detokenizer, begin, end = state["deferred_text"]
        state["_text"], state["deferred_text"] = detokenizer.text_between(begin, end), None
    return state["_text"]


def _set_text(self: RequestOutput, text: str) -> None:
    self.__dict__["_text"] = text


# after the dataclass is built: its __init__ and replace() go through the property
RequestOutput.text = property(_get_text, _set_text)  # type: ignore[assignment]
