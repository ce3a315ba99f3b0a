"""bfloat16 serving quality: the real SmolLM2 in bf16 picks float32's top-1 token almost always.

Teacher-forced over real text: bf16 generates a greedy continuation of each prompt (its decode
path), then both dtypes score every position of prompt + continuation (their prefill path).
At each position bf16's top-1 (from prefill, or the token its decode step chose) is compared
with float32's top-1 given the same prefix.
"""
from __future__ import annotations

import argparse
import inspect
import textwrap

import pytest

from workers.engine.config import EngineConfig
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

CONTINUATION = 48
CHATS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "What are three good habits for writing maintainable code?",
]


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


def test_bf16_top1_agrees_with_float32(model_dir):
    kwargs = {"model": model_dir, "max_model_len": 2048, "num_kv_blocks": 512}
    bf16 = LLMEngine(EngineConfig(**kwargs, dtype="bfloat16"))
    ids = prompts(bf16.tokenizer)
    generated = run(bf16, ids, SamplingParams(temperature=0, max_tokens=CONTINUATION,
                                              ignore_eos=True))
    full = [p + generated[str(i)]["tokens"] for i, p in enumerate(ids)]
    score = SamplingParams(max_tokens=1, prompt_logprobs=1)
    bf16_scores = run(bf16, full, score)
    del bf16
    f32_scores = run(LLMEngine(EngineConfig(**kwargs, dtype="float32")), full, score)

    agree = total = decode_agree = 0
    for i, p in enumerate(ids):
        ours, reference = (prompt_top1(s[str(i)]["prompt"]) for s in (bf16_scores, f32_scores))
        assert len(ours) == len(reference) == len(full[i]) - 1
        agree += sum(a == b for a, b in zip(ours, reference))
        total += len(reference)
        # the tokens bf16's decode steps chose, against float32's top-1 at the same prefix
        decode_agree += sum(a == b for a, b in zip(full[i][len(p):], reference[len(p) - 1:]))
    decode_total = CONTINUATION * len(ids)
    assert total >= 1000
    assert agree / total >= 0.97, f"prefill top-1 agreement {agree}/{total}"
    assert decode_agree / decode_total >= 0.97, \
        f"decode top-1 agreement {decode_agree}/{decode_total}"
