"""Whether a request can be served, checked before it enters the engine."""
from __future__ import annotations

from workers.engine.errors import ContextLengthError, InvalidRequestError
from workers.engine.sampling_params import SamplingParams


def validate_request(prompt_token_ids: list[int], params: SamplingParams, limit: int,
                     vocab_size: int) -> None:
    """Raise a typed error if the request cannot be served in `limit` tokens of context."""
    n = len(prompt_token_ids)
    if n == 0:
        raise InvalidRequestError("The prompt is empty.", param="prompt")
    if n >= limit:
        raise ContextLengthError(
            f"This model's maximum context length is {limit} tokens. However, your prompt "
            f"has {n} tokens, leaving no room for output.", param="messages")
    if params.max_tokens is not None and n + params.max_tokens > limit:
        raise ContextLengthError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} for the "
            f"completion). Please reduce the prompt or max_tokens.", param="max_tokens")
    prior = params.prior_output.token_ids if params.prior_output is not None else []
    if n + len(prior) >= limit:
        raise ContextLengthError(f"This model's maximum context length is {limit} tokens; "
                                 "the resumed request has no room left.", param="max_tokens")
    bad = [t for t in list(prompt_token_ids) + prior if not 0 <= t < vocab_size]
    bad += [t for t in list(params.logit_bias) + params.stop_token_ids
            if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary "
                                  f"[0, {vocab_size}).", param="prompt")
