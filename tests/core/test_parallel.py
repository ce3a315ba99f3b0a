"""Tensor and pipeline parallel engines (gloo on CPU) against the single-process engine.

A small random Llama-3 checkpoint, sharded with an index, runs the same mixed batch (chunked
prefills, decodes, prefix-cache hits, a preemption, prompt logprobs) with one rank and split
over ranks: every sampled row's logits match within fp32 tolerance and the greedy tokens are
identical; one step at a time, so are the steps; with micro-batches in a pipeline, the
requests. The real SmolLM2 (9 query heads, 3 KV heads) with TP=3 generates what TP=1 does,
each rank holding a third of the weights.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from workers.engine.config import EngineConfig
from workers.engine.fault_injection import InjectedFault
from workers.engine.llm import LLM
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

# 4 query heads over 1 KV head: with TP=2 the KV head is replicated on both ranks
SMALL = {"vocab_size": 301, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 1, "max_position_embeddings": 256,
         "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": {
             "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
             "rope_theta": 500000.0}}


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


def engine_config(model: str, tp: int, pp: int, micro_batches: int | None = None) -> EngineConfig:
    # 48 blocks of 4 tokens cannot hold every sequence at once: one gets preempted
    return EngineConfig(model=model, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                        pipeline_batches=micro_batches, dtype="float32", num_threads=1,
                        block_size=4, num_kv_blocks=48, max_num_seqs=6,
                        max_num_batched_tokens=32, max_model_len=256)


class RecordingSampler:
    """The engine's sampler, keeping every row it samples by (request, tokens so far)."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.rows: dict[tuple[str, int], torch.Tensor] = {}

    def __call__(self, logits, seqs):
        for row, seq in zip(logits, seqs, strict=True):
            self.rows[seq.request_id, len(seq.token_ids)] = row.clone()
        return self.sampler(logits, seqs)

    def __getattr__(self, name):
        return getattr(self.sampler, name)


def mixed_batch_run(config: EngineConfig) -> dict:
    """Engine steps until every request is done: each step's new tokens, each request's
    tokens, prompt logprobs and sampled logits rows, and the engine's counters."""
    llm = LLM(config)
    engine = llm.engine
    try:
        g = torch.Generator().manual_seed(1)
        shared = torch.randint(3, 301, (24,), generator=g).tolist()
        prompts = [shared + torch.randint(3, 301, (n,), generator=g).tolist()
                   for n in (3, 30, 9, 41)]
        greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        engine.sampler = sampler = RecordingSampler(engine.sampler)
        for i, p in enumerate(prompts):
            params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                    prompt_logprobs=2) if i == 1 else greedy
            engine.add_request(f"r{i}", p, params)
        steps, outputs, prompt_logprobs = [], {}, {}
        while engine.has_unfinished():
            if len(steps) == 24:  # the shared prefix's blocks are cached by now
                engine.add_request("late", shared + [5, 6, 7], greedy)
            step = engine.step()
            steps.append(sorted((o.request_id, o.token_ids) for o in step))
            for o in step:
                outputs[o.request_id] = outputs.get(o.request_id, []) + o.token_ids
                if o.prompt_logprobs:
                    prompt_logprobs[o.request_id] = o.prompt_logprobs
        assert engine.failed == [] and len(outputs["late"]) == 40
        return {"steps": steps, "outputs": outputs, "logits": sampler.rows,
                "prompt_logprobs": prompt_logprobs, "stats": engine.stats(),
                "weights": engine.runner.rank_weight_bytes}
    finally:
        llm.close()


def flat_logprobs(entries: list) -> tuple[list[int], torch.Tensor]:
    """Prompt logprobs ([None, (token, logprob, [(token, logprob), ...]), ...]) as the tokens
    in order and a tensor of their logprobs."""
    tokens, values = [], []
    for token, logprob, top in entries[1:]:
        tokens += [token] + [t for t, _ in top]
        values += [logprob] + [v for _, v in top]
    return tokens, torch.tensor(values)


@pytest.fixture(scope="module")
def reference(random_llama) -> dict:
    return mixed_batch_run(engine_config(random_llama, 1, 1))


@pytest.mark.parametrize("tp,pp,micro_batches", [(2, 1, None), (1, 2, 1), (1, 2, None),
                                                 (2, 2, None)],
                         ids=["tp2", "pp2-one-step-at-a-time", "pp2", "tp2xpp2"])
def test_parallel_engine_matches_single_rank(random_llama, reference, tp, pp, micro_batches):
    """One step at a time, a split engine runs the very steps one rank does. With two
    micro-batches in the pipeline the steps differ, but every request's tokens, logits and
    prompt logprobs are the same."""
    run = mixed_batch_run(engine_config(random_llama, tp, pp, micro_batches))
    stats = reference["stats"]
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0  # the mix happened
    if pp == 1 or micro_batches == 1:
        assert run["steps"] == reference["steps"]
        assert run["stats"]["num_preemptions"] == stats["num_preemptions"]
    else:  # each step reads one micro-batch: about half the requests
        assert max(len(step) for step in run["steps"]) < len(reference["outputs"])
        assert run["stats"]["num_preemptions"] > 0 and run["stats"]["prefix_cache_hits"] > 0
    assert run["outputs"] == reference["outputs"]
    assert run["prompt_logprobs"].keys() == reference["prompt_logprobs"].keys() == {"r1"}
    got, want = (flat_logprobs(r["prompt_logprobs"]["r1"]) for r in (run, reference))
    assert got[0] == want[0]  # the tokens
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)  # and their logprobs
    assert run["logits"].keys() == reference["logits"].keys()
    for key, want in reference["logits"].items():
        torch.testing.assert_close(run["logits"][key], want, rtol=1e-4, atol=1e-4)
    total = reference["weights"][0]
    assert len(run["weights"]) == tp * pp
    # every rank holds about its share; norms, the replicated KV head and vocab padding on top
    assert max(run["weights"]) < total / (tp * pp) * 1.3


def run_engine(engine: LLMEngine, prompts: dict[str, list[int]], abort_after: int | None = None,
               ) -> tuple[dict[str, list[int]], list[tuple[str, Exception]]]:
    """Every request greedy to 40 tokens; the newest micro-batch's first request aborted after
    `abort_after` steps, while it is in the pipeline."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for request_id, ids in prompts.items():
        engine.add_request(request_id, ids, params)
    tokens: dict[str, list[int]] = {}
    failed: list[tuple[str, Exception]] = []
    steps = 0
    while engine.has_unfinished():
        if steps == abort_after:
            assert engine.pipeline is not None and len(engine.pipeline.in_flight) == 2
            aborted = engine.pipeline.in_flight[-1].batch.seqs[0].request_id
            assert engine.abort(aborted).finish_reason == "abort"
            tokens[aborted] = tokens.get(aborted, []) + ["aborted"]
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        failed += engine.failed
        steps += 1
    return tokens, failed


def test_pipeline_fails_a_faulty_request_alone_and_an_abort_in_flight_frees_its_blocks(
        random_llama):
    g = torch.Generator().manual_seed(3)
    prompts = {f"ok-{i}": torch.randint(20, 301, (n,), generator=g).tolist()
               for i, n in enumerate((5, 17, 9, 30, 12))}
    marker_ids = [299, 300, 290, 280]  # "elomlear"
    prompts["bad"] = prompts["ok-0"][:3] + marker_ids + prompts["ok-1"][:4]
    engine = LLMEngine(engine_config(random_llama, 1, 2).model_copy(update={
        "num_kv_blocks": 128, "fault_marker": "MARKER"}))
    try:
        marker = engine.tokenizer.decode(marker_ids)
        assert all(marker not in engine.tokenizer.decode(p) for k, p in prompts.items()
                   if k != "bad")
        engine.faults.marker = marker
        tokens, failed = run_engine(engine, prompts, abort_after=5)
        bm = engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    finally:
        engine.close()
    assert [request_id for request_id, _ in failed] == ["bad"]
    assert isinstance(failed[0][1], InjectedFault)
    aborted = [k for k, t in tokens.items() if "aborted" in t]
    assert len(aborted) == 1 and len(tokens[aborted[0]]) < 41
    clean = LLMEngine(engine_config(random_llama, 1, 1).model_copy(update={"num_kv_blocks": 128}))
    try:
        expected, _ = run_engine(clean, {k: p for k, p in prompts.items()
                                         if k not in ("bad", aborted[0])})
    finally:
        clean.close()
    assert {k: t for k, t in tokens.items() if k not in ("bad", aborted[0])} == expected
    assert all(len(t) == 40 for t in expected.values())


def test_a_queue_longer_than_max_num_seqs_still_fills_every_micro_batch(random_llama):
    engine = LLMEngine(engine_config(random_llama, 1, 2).model_copy(update={
        "num_kv_blocks": 128, "max_num_seqs": 4}))
    try:
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        for i in range(10):
            engine.add_request(f"q{i}", [3 + i, 40, 50 + i], params)
        engine.step()
        engine.step()
        assert engine.pipeline is not None
        assert [len(step.batch) for step in engine.pipeline.in_flight] == [2, 2]
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
    finally:
        engine.close()
    assert sorted(tokens) == [f"q{i}" for i in range(10)]
    assert all(len(t) == 8 for t in tokens.values())


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


def test_smollm2_three_stages_greedy_matches_one_rank(model_dir):
    """The middle stage holds neither the (tied) embedding nor the head; three micro-batches
    are in flight, and the first stage keeps no copy of the head it never uses."""
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3,", "Once upon a",
               "Water boils at", "My favourite colour"]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outputs = {}
    for pp in (1, 3):
        llm = LLM(EngineConfig(model=model_dir, pipeline_parallel_size=pp, dtype="float32",
                               num_threads=1, num_kv_blocks=64, max_model_len=512))
        try:
            outputs[pp] = [o.token_ids for o in llm.generate(prompts, params)]
            model = llm.engine.runner.model
            assert (model.lm_head is None) == (pp > 1)  # tied: the first stage has no head
        finally:
            llm.close()
    assert outputs[3] == outputs[1]


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


def test_rendezvous_port_is_free_and_below_the_ephemeral_range():
    import socket

    from workers.engine.worker import PORT_FLOOR, ephemeral_port_floor, tcp_init_method

    port = int(tcp_init_method().rsplit(":", 1)[1])
    if ephemeral_port_floor() > PORT_FLOOR:
        # a process binding port 0 or connecting out can never be handed this port
        assert PORT_FLOOR <= port < ephemeral_port_floor()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
