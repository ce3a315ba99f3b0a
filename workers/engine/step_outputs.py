"""One step's outputs: recorded in the step loop, built into RequestOutputs by their reader.

Building a RequestOutput costs about a microsecond, a fair share of a step's host time with
hundreds of requests in it. The step loop records a tuple per request (what this step added);
the objects are built when the outputs are first read, on the reader's thread (the replica's
event loop, `LLM.generate`) while the engine thread runs the next forward, as vLLM v1 builds
them in its front-end process.
"""
from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from typing import overload

from workers.engine.outputs import RequestOutput, TokenLogprob
from workers.engine.sequence import Sequence


class StepOutputs(SequenceABC[RequestOutput]):
    def __init__(self) -> None:
        # (seq, token ids, logprobs, finish reason, tokens so far, text, deferred text,
        # prompt logprobs): what every field of the output depends on that can change later
        self.records: list[tuple] = []
        self._built: list[RequestOutput] | None = None

    def add(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob] | None,
            finish: str | None, text_end: int | None = None) -> None:
        """seq's delta: these tokens and the text they completed (`text_end`: tokens of
        token_ids with text, for a deferred detokenizer; None: no new text)."""
        detokenizer = seq.detokenizer
        if seq.eager_text:
            text, deferred = detokenizer.take(finished=finish is not None), None
        else:
            text, deferred = "", None if text_end is None else detokenizer.claim(text_end)
        prompt = take_prompt_logprobs(seq) if seq.wants_prompt_logprobs else None
        self.records.append((seq, tokens, logprobs, finish, len(seq.token_ids), text, deferred,
                             prompt))

    def build(self) -> list[RequestOutput]:
        if self._built is None:
            self._built = [
                RequestOutput(seq.request_id, text, tokens,
                              logprobs if seq.params.logprobs is not None else None, finish,
                              seq.num_prompt_tokens, num_tokens - seq.num_prompt_tokens,
                              seq.num_cached_tokens, prompt, deferred)
                for seq, tokens, logprobs, finish, num_tokens, text, deferred, prompt
                in self.records]
        return self._built

    def __len__(self) -> int:
        return len(self.records)

    @overload
    def __getitem__(self, index: int) -> RequestOutput: ...

    @overload
    def __getitem__(self, index: slice) -> list[RequestOutput]: ...

    def __getitem__(self, index: int | slice) -> RequestOutput | list[RequestOutput]:
        return self.build()[index]

    def __iter__(self) -> Iterator[RequestOutput]:
        return iter(self.build())


def take_prompt_logprobs(seq: Sequence) -> list | None:
    """Prompt logprobs ride on a request's first output only."""
    if seq.num_output_tokens > 1 or seq.prompt_logprobs is None:
        return None
    taken, seq.prompt_logprobs = seq.prompt_logprobs, []
    return taken or None
