"""The engine on SmolLM2 with the Triton backend (interpreted on CPU) matches the torch backend,
with its cache in the model's dtype or in E4M3, and its FP8 inputs fused into the norm and
SiLU-mul kernels match the unfused ones."""
from __future__ import annotations

import pytest

from workers.engine.config import EngineConfig
from workers.engine.llm import LLM
from workers.engine.llm_engine import LLMEngine
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PREFIX = "You are a helpful assistant. Answer in one short sentence. Question: "


def greedy(model_dir: str, backend: str, kv_cache_dtype: str = "auto"
           ) -> tuple[list[list[int]], int]:
    """A 16-token step budget cuts the first prompt into two chunks while "Hi" decodes beside
    it (mixed batches); the second call hits the prefix cache, so prefill runs after a cached
    block too. Kept small: the interpreter runs each Triton program in Python."""
    # float32, like every token-equality test: bf16 backends may round a near-tie apart
    llm = LLM(EngineConfig(model=model_dir, attention_backend=backend, block_size=8,
                           max_model_len=128, num_kv_blocks=32, max_num_seqs=4,
                           max_num_batched_tokens=16, dtype="float32",
                           kv_cache_dtype=kv_cache_dtype))
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


def test_an_fp8_kv_cache_reads_the_same_with_both_backends(model_dir):
    """Both backends write the same E4M3 bits (tests/kernel/test_kv_cache_fp8.py) and attend
    over them in float32: the same greedy tokens, through chunked prefill and a prefix hit."""
    triton_tokens, triton_cached = greedy(model_dir, "triton", "fp8")
    torch_tokens, torch_cached = greedy(model_dir, "torch", "fp8")
    assert triton_cached > 0 and triton_cached == torch_cached
    assert triton_tokens == torch_tokens


def run_one(engine: LLMEngine, request_id: str, prompt: list[int],
            params: SamplingParams) -> RequestOutput:
    engine.add_request(request_id, prompt, params)
    out = RequestOutput(request_id)
    while engine.has_unfinished():
        for delta in engine.step():
            out = out.merge(delta)
    return out


def test_fp8_inputs_from_the_norm_and_silu_kernels_change_no_logit(model_dir):
    """With FP8 weights, the RMSNorm and SiLU-mul kernels that quantize the next linear's input
    give the same logits, prompt and sampled, as quantizing it after them. float16: the rows
    are rounded to the compute dtype before they are quantized (the interpreter has no bf16
    attention). No CUDA graphs on a GPU: they would keep replaying the fused kernels."""
    engine = LLMEngine(EngineConfig(model=model_dir, attention_backend="triton",
                                    quantization="fp8", dtype="float16", block_size=8,
                                    max_model_len=64, num_kv_blocks=16, max_num_seqs=2,
                                    enable_prefix_caching=False, cuda_graphs=False))
    model = engine.runner.model
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, logprobs=5,
                            prompt_logprobs=5)
    prompt = engine.tokenizer.encode("The capital of France is")
    assert model.fuse_fp8_inputs() == 3 * model.cfg.num_layers
    fused = run_one(engine, "fused", prompt, params)
    assert model.fuse_fp8_inputs(enabled=False) == 0
    unfused = run_one(engine, "unfused", prompt, params)
    assert len(fused.token_ids) == 2 and fused.prompt_logprobs
    assert fused.token_ids == unfused.token_ids
    assert fused.logprobs == unfused.logprobs
    assert fused.prompt_logprobs == unfused.prompt_logprobs
