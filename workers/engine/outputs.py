"""What the engine hands back to callers, one delta per request per step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.engine.sequence import Sequence

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


def request_output(seq: Sequence, tokens: list[int], logprobs: list,
                   finish: str | None) -> RequestOutput:
    """seq's delta since its previous output: these tokens and the text they completed."""
    return RequestOutput(
        request_id=seq.request_id,
        text=seq.detokenizer.take(finished=finish is not None),
        token_ids=tokens,
        logprobs=logprobs if seq.params.logprobs is not None else None,
        finish_reason=finish,
        prompt_tokens=seq.num_prompt_tokens,
        completion_tokens=seq.num_output_tokens,
        cached_tokens=seq.num_cached_tokens,
        prompt_logprobs=take_prompt_logprobs(seq),
    )


def take_prompt_logprobs(seq: Sequence) -> list | None:
    """Prompt logprobs ride on a request's first output only."""
    if seq.params.prompt_logprobs is None or seq.num_output_tokens > 1 or \
            seq.prompt_logprobs is None:
        return None
    taken, seq.prompt_logprobs = seq.prompt_logprobs, []
    return taken or None
