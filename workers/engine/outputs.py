"""What the engine hands back to callers, one delta per request per step."""
from __future__ import annotations

from dataclasses import dataclass, field

# One entry per sampled token: (token_id, logprob, [(top_token_id, top_logprob), ...]).
TokenLogprob = tuple[int, float, list[tuple[int, float]]]


@dataclass
class RequestOutput:
    """The new part of one request's generation since the previous output.

    `text` and `token_ids` are deltas; `finish_reason` is set on the last output
    ("stop", "length" or "abort"); usage counts are totals so far.
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
