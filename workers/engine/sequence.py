"""One request's state inside the engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from workers.engine.block_hash import ROOT_HASH, hash_block
from workers.engine.outputs import RequestOutput, TokenLogprob
from workers.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_pending: int = 0  # sampled on the device, not yet in token_ids (overlapped steps)
    block_table: list[int] = field(default_factory=list)
    num_registered_blocks: int = 0  # leading blocks already in the prefix cache
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first schedule
    num_preemptions: int = 0
    finish_reason: str | None = None
    generator: Any = None  # torch.Generator for seeded sampling
    grammar: Any = None  # workers.engine.grammar.Grammar when decoding is constrained
    detokenizer: Any = None  # workers.engine.detokenizer.Detokenizer
    # filled during prefill when params ask for them
    prompt_logprobs: list[TokenLogprob | None] | None = None
    _hashes: list[int] = field(default_factory=list, repr=False)
    # greedy with nothing to apply to its logits (a grammar is checked apart): argmax alone
    plain_greedy: bool = field(default=False, init=False, repr=False)
    # no penalties or min_tokens (a grammar is checked apart): sampling reads no past tokens
    history_free: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        p = self.params
        self.history_free = not p.min_tokens and not p.presence_penalty and \
            not p.frequency_penalty and p.repetition_penalty == 1.0
        self.plain_greedy = self.history_free and p.greedy and p.logprobs is None and \
            not p.logit_bias

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens the scheduler can compute: the known ones and those still on the device."""
        return self.num_tokens + self.num_pending

    @property
    def reaches_max_tokens(self) -> bool:
        """Its pending tokens end it by max_tokens: nothing more to compute."""
        limit = self.params.max_tokens
        return limit is not None and self.num_output_tokens + self.num_pending >= limit

    @property
    def finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def block_hashes(self, block_size: int) -> list[int]:
        """Chained hashes of the full blocks of token_ids, extended incrementally."""
        hashes = self._hashes
        for i in range(len(hashes), self.num_tokens // block_size):
            parent = hashes[-1] if hashes else ROOT_HASH
            block = tuple(self.token_ids[i * block_size:(i + 1) * block_size])
            hashes.append(hash_block(parent, block))
        return hashes


def request_output(seq: Sequence, tokens: list[int], logprobs: list | None,
                   finish: str | None, text_end: int | None = None) -> RequestOutput:
    """seq's delta since its previous output: these tokens and the text they completed
    (`text_end`: tokens of token_ids with text, for a deferred detokenizer; None: no new)."""
    detokenizer = seq.detokenizer
    if detokenizer.source is None:
        text, deferred = detokenizer.take(finished=finish is not None), None
    else:
        text, deferred = "", None if text_end is None else detokenizer.claim(text_end)
    return RequestOutput(
        request_id=seq.request_id,
        text=text,
        token_ids=tokens,
        logprobs=logprobs if seq.params.logprobs is not None else None,
        finish_reason=finish,
        prompt_tokens=seq.num_prompt_tokens,
        completion_tokens=seq.num_output_tokens,
        cached_tokens=seq.num_cached_tokens,
        prompt_logprobs=take_prompt_logprobs(seq),
        deferred_text=deferred,
    )


def take_prompt_logprobs(seq: Sequence) -> list | None:
    """Prompt logprobs ride on a request's first output only."""
    if seq.params.prompt_logprobs is None or seq.num_output_tokens > 1 or \
            seq.prompt_logprobs is None:
        return None
    taken, seq.prompt_logprobs = seq.prompt_logprobs, []
    return taken or None
