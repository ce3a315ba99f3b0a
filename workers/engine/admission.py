"""A request entering the engine: the checks it must pass, and the Sequence built for it."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from workers.engine.detokenizer import Detokenizer
from workers.engine.errors import ContextLengthError, InvalidRequestError
from workers.engine.sampler import uniform_draws
from workers.engine.sampling_params import PriorOutput, SamplingParams
from workers.engine.sequence import Sequence

if TYPE_CHECKING:
    from xgrammar import CompiledGrammar


def check_request(prompt_token_ids: list[int], params: SamplingParams, max_model_len: int,
                  vocab_size: int) -> None:
    """Raise a typed error if the request cannot be served."""
    if not prompt_token_ids:
        raise InvalidRequestError("The prompt is empty.", param="prompt")
    prior = params.prior_output.token_ids if params.prior_output is not None else []
    n = len(prompt_token_ids)
    if n + len(prior) >= max_model_len:  # a resumed request's output so far counts as prompt
        raise ContextLengthError(max_model_len, n + len(prior))
    if params.max_tokens is not None and n + params.max_tokens > max_model_len:
        raise ContextLengthError(max_model_len, n, params.max_tokens)
    for param, ids in (("prompt", list(prompt_token_ids) + prior),
                       ("logit_bias", params.logit_bias),
                       ("stop_token_ids", params.stop_token_ids)):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"Token id {bad} is outside the vocabulary "
                                      f"[0, {vocab_size}).", param)


def new_sequence(request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 compiled: CompiledGrammar | None, tokenizer, vocab_size: int,
                 device: torch.device | str, eos_token_ids: frozenset[int],
                 max_model_len: int) -> Sequence:
    """The request's Sequence with its generator, grammar, detokenizer and limits; a resumed
    request arrives where its lost replica left it."""
    seq = Sequence(request_id, list(prompt_token_ids), params)
    if params.ignore_eos:
        seq.stop_ids = frozenset(params.stop_token_ids)
    elif params.stop_token_ids:
        seq.stop_ids = eos_token_ids.union(params.stop_token_ids)
    else:  # most requests: one shared set, not one per request to read every step
        seq.stop_ids = eos_token_ids
    seq.token_limit = max_model_len if params.max_tokens is None else \
        min(max_model_len, seq.num_prompt_tokens + params.max_tokens)
    if params.seed is not None:
        seq.generator = torch.Generator(device=device).manual_seed(params.seed)
    if compiled is not None:
        from workers.engine.grammar import Grammar  # xgrammar is only needed here

        seq.grammar = Grammar(compiled, vocab_size)
    seq.detokenizer = Detokenizer(tokenizer, seq.prompt_token_ids, params.stop,
                                  params.skip_special_tokens)
    if params.prior_output is not None:
        replay_prior_output(seq, params.prior_output, device)
    if not seq.eager_text:  # no text needed to decide its end: decoded when outputs are read
        seq.detokenizer.defer(seq.token_ids)
    return seq


def replay_prior_output(seq: Sequence, prior: PriorOutput, device: torch.device | str) -> None:
    """The tokens become output; the detokenizer, grammar and seeded generator advance
    exactly as they did on the lost replica."""
    for token in prior.token_ids:
        seq.token_ids.append(token)
        if seq.grammar is not None:
            seq.grammar.accept(token)
        seq.detokenizer.add_token(token, check_stop=seq.num_output_tokens >=
                                  seq.params.min_tokens)
        if seq.generator is not None:
            uniform_draws(1, device, seq.generator)
    seq.detokenizer.skip(prior.num_chars_sent)
