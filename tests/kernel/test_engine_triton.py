"""The engine on SmolLM2 with the Triton backend (interpreted on CPU) matches the torch backend."""
from __future__ import annotations

import pytest

from workers.engine.config import EngineConfig
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PREFIX = "You are a helpful assistant. Answer in one short sentence. Question: "


def greedy(model_dir: str, backend: str) -> tuple[list[list[int]], int]:
    """A 16-token step budget cuts the first prompt into two chunks while "Hi" decodes beside
    it (mixed batches); the second call hits the prefix cache, so prefill runs after a cached
    block too. Kept small: the interpreter runs each Triton program in Python."""
    # float32, like every token-equality test: bf16 backends may round a near-tie apart
    llm = LLM(EngineConfig(model=model_dir, attention_backend=backend, block_size=8,
                           max_model_len=128, num_kv_blocks=32, max_num_seqs=4,
                           max_num_batched_tokens=16, dtype="float32"))
    assert llm.engine.runner.backend.name == backend
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = llm.generate([PREFIX + "What is the capital of France?", "Hi"], params)
    second = llm.generate([PREFIX + "Why is the sky blue?"], params)
    return [out.token_ids for out in first + second], second[0].cached_tokens


def test_triton_backend_greedy_matches_torch_backend(model_dir):
    triton_tokens, triton_cached = greedy(model_dir, "triton")
    torch_tokens, torch_cached = greedy(model_dir, "torch")
    assert triton_cached > 0 and triton_cached == torch_cached
    assert all(len(t) == 4 for t in triton_tokens)
    assert triton_tokens == torch_tokens
