"""One request's state inside the engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from workers.engine.block_hash import ROOT_HASH, hash_block
from workers.engine.outputs import TokenLogprob
from workers.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)  # slots: read hundreds of times per step
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_pending: int = 0  # sampled on the device, not yet in token_ids (overlapped steps)
    pending_row: int = 0  # the row that token was sampled in, in the step in flight
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
    # stop strings need the text as tokens arrive; without them it is decoded on read
    eager_text: bool = field(default=False, init=False, repr=False)
    wants_prompt_logprobs: bool = field(default=False, init=False, repr=False)
    # set at admission: tokens that end it (stop token ids, EOS unless ignored) once
    # min_tokens are out, and the token count that ends it by length (max_tokens, context)
    stop_ids: frozenset[int] = field(default=frozenset(), init=False, repr=False)
    token_limit: int = field(default=1 << 62, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        p = self.params
        self.history_free = not p.min_tokens and not p.presence_penalty and \
            not p.frequency_penalty and p.repetition_penalty == 1.0
        self.plain_greedy = self.history_free and p.greedy and p.logprobs is None and \
            not p.logit_bias
        self.eager_text = bool(p.stop)
        self.wants_prompt_logprobs = p.prompt_logprobs is not None
        if self.wants_prompt_logprobs and self.num_prompt_tokens == 1:
            # no step computes a row for it: its one token has no context to be predicted from
            self.prompt_logprobs = [None]

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
        return len(self.token_ids) + self.num_pending

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

