"""Top-1 agreement of two engine variants on the real SmolLM2, teacher-forced over real text.

The variant under test generates a greedy continuation of each prompt (its decode path), then
both variants score every position of prompt + continuation (their prefill path). At each
position the variant's top-1 (from prefill, or the token its decode step chose) is compared
with the reference's top-1 given the same prefix.
"""
from __future__ import annotations

import argparse
import inspect
import textwrap
from dataclasses import dataclass

from workers.engine.config import EngineConfig
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

CHATS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "What are three good habits for writing maintainable code?",
]


@dataclass
class Agreement:
    prefill: int
    prefill_total: int
    decode: int
    decode_total: int

    def __str__(self) -> str:
        return (f"prefill top-1 {self.prefill}/{self.prefill_total} "
                f"({self.prefill / self.prefill_total:.2%}), decode top-1 "
                f"{self.decode}/{self.decode_total} ({self.decode / self.decode_total:.2%})")


def prompts(tokenizer) -> list[list[int]]:
    texts = [argparse.__doc__, inspect.getsource(textwrap.dedent)]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                           add_generation_prompt=True) for c in CHATS]
    return [tokenizer.encode(t) for t in texts + chats]


def run(engine: LLMEngine, token_ids: list[list[int]], params: SamplingParams) -> dict:
    for i, ids in enumerate(token_ids):
        engine.add_request(str(i), ids, params)
    outputs: dict[str, dict] = {str(i): {"tokens": [], "prompt": []} for i in range(len(token_ids))}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id]["tokens"] += out.token_ids
            outputs[out.request_id]["prompt"] += out.prompt_logprobs or []
    return outputs


def prompt_top1(prompt_logprobs: list) -> list[int]:
    """The top-1 token at each position that predicts a prompt token."""
    return [top[0][0] for _, _, top in prompt_logprobs[1:]]


def measure(config: dict, variant: dict, reference: dict, continuation: int) -> Agreement:
    """EngineConfig(**config, **variant) against EngineConfig(**config, **reference)."""
    engine = LLMEngine(EngineConfig(**config, **variant))
    ids = prompts(engine.tokenizer)
    generated = run(engine, ids, SamplingParams(temperature=0, max_tokens=continuation,
                                                ignore_eos=True))
    full = [p + generated[str(i)]["tokens"] for i, p in enumerate(ids)]
    score = SamplingParams(max_tokens=1, prompt_logprobs=1)
    ours = run(engine, full, score)
    del engine
    theirs = run(LLMEngine(EngineConfig(**config, **reference)), full, score)
    result = Agreement(0, 0, 0, continuation * len(ids))
    for i, p in enumerate(ids):
        mine, ref = (prompt_top1(s[str(i)]["prompt"]) for s in (ours, theirs))
        assert len(mine) == len(ref) == len(full[i]) - 1
        result.prefill += sum(a == b for a, b in zip(mine, ref, strict=True))
        result.prefill_total += len(ref)
        # the tokens the variant's decode steps chose, against the reference's top-1
        result.decode += sum(a == b for a, b in zip(full[i][len(p):], ref[len(p) - 1:],
                                                    strict=True))
    return result
