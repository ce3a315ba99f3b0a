"""Tensor and pipeline parallel engines (gloo on CPU) against the single-process engine.

A small random Llama-3 checkpoint, sharded with an index, runs the same 64-step mixed batch
(chunked prefills, decodes, prefix-cache hits, a preemption, prompt logprobs) with one rank and
split over ranks: every step's logits match within fp32 tolerance and the greedy tokens are
identical. The real SmolLM2 (9 query heads, 3 KV heads) with TP=3 generates what TP=1 does,
each rank holding a third of the weights.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from workers.engine.config import EngineConfig
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

# 4 query heads over 1 KV head: with TP=2 the KV head is replicated on both ranks
SMALL = {"vocab_size": 301, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 1, "max_position_embeddings": 256,
         "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": {
             "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
             "rope_theta": 500000.0}}
STEPS = 64


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory, model_dir) -> str:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    with torch.no_grad():  # peaked logits: greedy choices are far from ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.15)
    folder = tmp_path_factory.mktemp("llama3-small")
    model.save_pretrained(folder, max_shard_size="100KB")  # model-0000x-of-0000y + index
    assert (folder / "model.safetensors.index.json").exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{model_dir}/{name}", folder)
    return str(folder)


def engine_config(model: str, tp: int, pp: int) -> EngineConfig:
    # 48 blocks of 4 tokens cannot hold every sequence at once: one gets preempted
    return EngineConfig(model=model, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                        dtype="float32", num_threads=1, block_size=4, num_kv_blocks=48,
                        max_num_seqs=6, max_num_batched_tokens=32, max_model_len=256)


def mixed_batch_run(config: EngineConfig) -> dict:
    """64 engine steps; per step the sampled logits and tokens, plus the engine's counters."""
    llm = LLM(config)
    engine = llm.engine
    try:
        g = torch.Generator().manual_seed(1)
        shared = torch.randint(3, 301, (24,), generator=g).tolist()
        prompts = [shared + torch.randint(3, 301, (n,), generator=g).tolist()
                   for n in (3, 30, 9, 41)]
        greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        logits, tokens = [], []
        execute = engine.runner.execute

        def recording(batch):
            out = execute(batch)
            logits.append(None if out.sample is None else out.sample.clone())
            return out

        engine.runner.execute = recording
        for i, p in enumerate(prompts):
            params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                    prompt_logprobs=2) if i == 1 else greedy
            engine.add_request(f"r{i}", p, params)
        for step in range(STEPS):
            if step == 24:  # the shared prefix's blocks are cached by now
                engine.add_request("late", shared + [5, 6, 7], greedy)
            tokens.append(sorted((o.request_id, o.token_ids) for o in engine.step()))
        return {"logits": logits, "tokens": tokens, "stats": engine.stats(),
                "weights": engine.runner.rank_weight_bytes}
    finally:
        llm.close()


@pytest.fixture(scope="module")
def reference(random_llama) -> dict:
    return mixed_batch_run(engine_config(random_llama, 1, 1))


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_parallel_engine_matches_single_rank(random_llama, reference, tp, pp):
    run = mixed_batch_run(engine_config(random_llama, tp, pp))
    stats = reference["stats"]
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0  # the mix happened
    assert run["stats"]["num_preemptions"] == stats["num_preemptions"]
    assert run["tokens"] == reference["tokens"]
    assert len(run["logits"]) == len(reference["logits"])
    for got, want in zip(run["logits"], reference["logits"]):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    total = reference["weights"][0]
    assert len(run["weights"]) == tp * pp
    # every rank holds about its share; norms, the replicated KV head and vocab padding on top
    assert max(run["weights"]) < total / (tp * pp) * 1.3


def test_smollm2_tp3_greedy_matches_tp1_and_each_rank_holds_a_third(model_dir):
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3,"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs, weights = {}, {}
    for tp in (1, 3):
        llm = LLM(EngineConfig(model=model_dir, tensor_parallel_size=tp, dtype="float32",
                               num_threads=1, num_kv_blocks=64, max_model_len=512))
        try:
            outputs[tp] = [o.token_ids for o in llm.generate(prompts, params)]
            weights[tp] = llm.engine.runner.rank_weight_bytes
            model = llm.engine.runner.model
            norms = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                        if "layernorm" in name or name == "norm")
        finally:
            llm.close()
    assert outputs[3] == outputs[1]
    total = weights[1][0]
    # q/k/v, o, gate/up, down and the tied embedding split three ways; only norms replicate
    assert weights[3] == [(total - norms) // 3 + norms] * 3


def test_overlapped_steps_split_over_ranks_generate_what_plain_steps_on_one_rank_do(
        random_llama):
    """Decode inputs in flight live on the driver's device; the workers get them from the
    driver's broadcast, or their halves of every embedding (vocab-parallel) would be wrong."""
    g = torch.Generator().manual_seed(2)
    shared = torch.randint(3, 301, (24,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 301, (n,), generator=g).tolist() for n in (3, 30, 9)]
    prompts.append(shared + [5, 6, 7])  # a prefix-cache hit
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outputs, stats = {}, {}
    for tp, overlap in ((1, False), (2, True)):
        llm = LLM(engine_config(random_llama, tp, 1).model_copy(
            update={"async_scheduling": overlap}))
        try:
            assert llm.engine.async_scheduling == overlap
            outputs[tp] = [o.token_ids for o in llm.generate(prompts, params)]
            stats[tp] = llm.engine.stats()
        finally:
            llm.close()
    assert stats[1]["num_preemptions"] > 0 and stats[1]["prefix_cache_hits"] > 0
    assert outputs[2] == outputs[1]
    assert all(len(tokens) == 40 for tokens in outputs[1])
