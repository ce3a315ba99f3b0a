"""`kv_cache_dtype: fp8` on the real SmolLM2: the cache holds E4M3 keys and values, so the same
memory holds twice the blocks of a bf16 cache, and the engine serves from it as from any cache
(preemption and recompute, prefix hits, aborts). Its accuracy is in test_fp8_accuracy.py, the
kernels' exactness in tests/kernel/test_kv_cache_fp8.py."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from workers.engine.config import EngineConfig
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a small town by the sea, there lived an old fisherman who"]


def make_llm(model_dir: str, **options) -> LLM:
    config = {"dtype": "bfloat16", **options}
    return LLM(EngineConfig(model=model_dir, block_size=8, max_model_len=256, max_num_seqs=4,
                            max_num_batched_tokens=64, **config))


@pytest.mark.parametrize("backend", ["cpu", "flash"])
def test_backends_that_cannot_read_e4m3_are_refused(backend):
    with pytest.raises(ValidationError, match="kv_cache_dtype fp8 needs the triton or torch"):
        EngineConfig(kv_cache_dtype="fp8", attention_backend=backend)
    with pytest.raises(ValidationError):
        EngineConfig(kv_cache_dtype="fp16")


def test_the_same_memory_holds_twice_the_blocks(model_dir):
    sizes = {}
    for kv in ("auto", "fp8"):
        llm = make_llm(model_dir, kv_cache_dtype=kv, kv_cache_memory_gb=0.01)
        runner = llm.engine.runner
        assert all(c.dtype == (torch.float8_e4m3fn if kv == "fp8" else torch.bfloat16)
                   for pair in runner.kv_caches for c in pair)
        sizes[kv] = (runner.kv_bytes_per_token, runner.num_blocks)
        llm.engine.close()
    assert sizes["fp8"][0] * 2 == sizes["auto"][0]
    assert sizes["fp8"][1] in (2 * sizes["auto"][1], 2 * sizes["auto"][1] + 1)


def test_preemption_prefix_hits_and_aborts_with_an_e4m3_cache(model_dir):
    """A pool too small for the batch preempts and recomputes into E4M3 blocks: the same tokens
    as a pool that never preempts (float32, as every token-equality test); a repeated prompt
    hits the cache; an abort and every finished request give their blocks back."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    roomy = make_llm(model_dir, kv_cache_dtype="fp8", num_kv_blocks=64, dtype="float32")
    expected = [o.token_ids for o in roomy.generate(PROMPTS, params)]
    again = roomy.generate(PROMPTS[2:], params)[0]
    assert again.cached_tokens > 0 and again.token_ids == expected[2]
    engine = roomy.engine
    engine.add_request("gone", engine.tokenizer.encode(PROMPTS[1]), params)
    for _ in range(3):
        engine.step()
    assert engine.abort("gone").finish_reason == "abort"
    tight = make_llm(model_dir, kv_cache_dtype="fp8", num_kv_blocks=10, dtype="float32")
    assert [o.token_ids for o in tight.generate(PROMPTS, params)] == expected
    assert tight.engine.scheduler.num_preemptions > 0
    for llm in (roomy, tight):
        blocks = llm.engine.block_manager
        assert blocks.num_free_blocks == blocks.num_blocks
        assert all(b.ref_count == 0 for b in blocks.blocks)
