"""Per-request sampling and stopping parameters."""
from __future__ import annotations

from dataclasses import dataclass, field

from workers.engine.errors import InvalidRequestError

MAX_LOGPROBS = 20
SAMPLING_EPS = 1e-5  # temperatures below this sample greedily (dividing by them overflows)
INT64_MAX = 2**63 - 1
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass
class PriorOutput:
    """Output a request already produced on a replica that was lost; the engine continues after
    it, counting these tokens as output (penalties, min_tokens, max_tokens, stop checks, usage)."""

    token_ids: list[int]
    num_chars_sent: int  # characters of their text the client already received


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per sampled token; 0: sampled only
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True
    # JSON schema (dict) or {"type": "object"} for json_object; compiled by the grammar module.
    json_schema: dict | None = None
    grammar: str | None = None  # an EBNF grammar (xgrammar's dialect), the other constraint
    prior_output: PriorOutput | None = None  # set when resuming a request on another replica

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self.validate()
        if self.temperature < SAMPLING_EPS:
            self.temperature = 0.0

    def _bad(self, param: str, message: str) -> None:
        raise InvalidRequestError(message, param=param)

    def validate(self) -> None:
        if self.n < 1:
            self._bad("n", f"n must be at least 1, got {self.n}.")
        if not 0.0 <= self.temperature <= 2.0:
            self._bad("temperature", f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            self._bad("top_p", f"top_p must be in (0, 1], got {self.top_p}.")
        if not -1 <= self.top_k <= INT64_MAX:
            self._bad("top_k", f"top_k must be -1 (disabled) or a positive 64-bit integer, "
                      f"got {self.top_k}.")
        low, high = SEED_RANGE
        if self.seed is not None and not low <= self.seed <= high - (self.n - 1):
            self._bad("seed", f"seed must be in [{low}, {high}] (choice i uses seed + i, so "
                      f"at most {high - (self.n - 1)} with n={self.n}), got {self.seed}.")
        if not 0.0 <= self.min_p <= 1.0:
            self._bad("min_p", f"min_p must be in [0, 1], got {self.min_p}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            self._bad("presence_penalty",
                      f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            self._bad("frequency_penalty",
                      f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not 0.0 < self.repetition_penalty <= 2.0:
            self._bad("repetition_penalty",
                      f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            self._bad("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            self._bad("min_tokens", f"min_tokens must be non-negative, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            self._bad("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed "
                      f"max_tokens ({self.max_tokens}).")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                self._bad(name, f"{name} must be in [0, {MAX_LOGPROBS}], got {value}.")
        if self.prior_output is not None:
            if self.prompt_logprobs is not None:
                self._bad("prompt_logprobs", "a resumed request cannot ask for prompt logprobs.")
            if self.max_tokens is not None and len(self.prior_output.token_ids) >= self.max_tokens:
                self._bad("max_tokens", "a resumed request has no tokens left to generate.")
        for token, bias in self.logit_bias.items():
            if not -100.0 <= bias <= 100.0:
                self._bad("logit_bias", f"logit_bias for token {token} must be in [-100, 100].")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
