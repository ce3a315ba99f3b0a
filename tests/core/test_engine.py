"""The engine on the real SmolLM2 weights, checked against HF transformers."""
from __future__ import annotations

import threading
from itertools import pairwise

import pytest
import torch
from transformers import AutoModelForCausalLM

from workers.engine.config import EngineConfig
from workers.engine.errors import ContextLengthError, InvalidRequestError
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    ("Once upon a time, in a land far away, there lived a young girl who loved to read books "
     "about dragons, castles and the stars. One evening she"),
    "1, 2, 3,",
    "Water boils at",
]


@pytest.fixture(scope="module")
def llm(model_dir):
    # float32: compared token for token and logit for logit with HF in float32
    return LLM(EngineConfig(model=model_dir, max_model_len=1024, num_kv_blocks=256,
                            dtype="float32"))


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(hf, tokenizer, prompt: str, n: int) -> list[int]:
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, ids.shape[1]:].tolist()


def assert_all_blocks_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_greedy_matches_hf_batched_mixed_lengths(llm, hf):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(hf, llm.tokenizer, prompt, 20), prompt
        assert out.finish_reason == "length"
    assert_all_blocks_free(llm)


def test_logits_close_to_hf(llm, hf):
    """A mixed batch (one prefill + decodes) gives HF's next-token logits."""
    engine = llm.engine
    ids = [llm.tokenizer.encode(p) for p in PROMPTS[:3]]
    for i, p in enumerate(ids):
        engine.add_request(f"logits-{i}", p, SamplingParams(max_tokens=2))
    batch = engine.scheduler.schedule()
    logits = engine.runner.execute(batch).sample
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += n
    with torch.no_grad():
        for row, p in enumerate(ids):
            ref = hf(torch.tensor([p])).logits[0, -1]
            torch.testing.assert_close(logits[row], ref, rtol=1e-3, atol=1e-3)
    for i in range(3):
        engine.abort(f"logits-{i}")
    assert_all_blocks_free(llm)


def test_tiny_kv_pool_preempts_and_output_is_identical(model_dir, llm):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(PROMPTS, params)]
    small = LLM(EngineConfig(model=model_dir, max_model_len=1024, num_kv_blocks=12,
                             block_size=8, max_num_batched_tokens=64, dtype="float32"))
    outs = small.generate(PROMPTS, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    assert_all_blocks_free(small)


def test_prefix_cache_computes_only_new_tokens(llm):
    engine = llm.engine
    prompt = llm.tokenizer.encode(PROMPTS[2]) * 2  # long enough for several full blocks
    params = SamplingParams(temperature=0, max_tokens=8)
    first = llm.generate([prompt], params)[0]
    computed = []
    orig = engine.runner.execute

    def counting(batch):
        computed.append(batch.num_tokens)
        return orig(batch)

    engine.runner.execute = counting
    try:
        second = llm.generate([prompt], params)[0]
    finally:
        engine.runner.execute = orig
    bs = engine.config.block_size
    cached = (len(prompt) - 1) // bs * bs
    assert second.cached_tokens == cached > 0
    assert computed[0] == len(prompt) - cached  # the prefill step ran only the uncached tail
    assert second.token_ids == first.token_ids
    assert_all_blocks_free(llm)


def test_seeded_sampling_is_reproducible(llm):
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=s, max_tokens=16, ignore_eos=True)
              for s in (1, 1, 2)]
    a, b, c = llm.generate([PROMPTS[0]] * 3, params)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stop_string_spanning_tokens_is_not_emitted(llm):
    base = llm.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=12))[0]
    # pick a stop string that starts inside one token and ends in the next
    text = base.text
    pieces = [llm.tokenizer.decode(base.token_ids[:i]) for i in range(1, len(base.token_ids))]
    cut = len(pieces[2])
    stop = text[cut - 1:cut + 2]
    out = llm.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=12, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:text.index(stop)]
    assert stop not in out.text


def test_stop_token_ids_min_tokens_and_eos(llm):
    base = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8))[0]
    stop_id = base.token_ids[2]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8,
                                                    stop_token_ids=[stop_id]))[0]
    assert out.token_ids == base.token_ids[:3] and out.finish_reason == "stop"
    eos = llm.tokenizer.eos_token_id
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi"}],
                                             add_generation_prompt=True, tokenize=False)
    ended = llm.generate([chat], SamplingParams(temperature=0, max_tokens=64))[0]
    assert ended.finish_reason == "stop" and ended.token_ids[-1] == eos
    longer = llm.generate([chat], SamplingParams(temperature=0, max_tokens=64,
                                                 min_tokens=len(ended.token_ids) + 3))[0]
    assert len(longer.token_ids) >= len(ended.token_ids) + 3
    assert eos not in longer.token_ids[:len(ended.token_ids) + 2]


def test_prefix_hash_collision_serves_no_other_prompts_kv(llm, monkeypatch):
    params = SamplingParams(temperature=0, max_tokens=6)
    prompts = [llm.tokenizer.encode(PROMPTS[2]), llm.tokenizer.encode(PROMPTS[2].upper())]
    assert len(prompts[1]) > llm.engine.config.block_size
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    monkeypatch.setattr("workers.engine.sequence.hash_block", lambda parent, tokens: 1)
    first = llm.generate([prompts[0]], params)[0]
    second = llm.generate([prompts[1]], params)[0]  # every block "hits" the first prompt's
    assert [first.token_ids, second.token_ids] == expected
    assert second.cached_tokens == 0
    assert_all_blocks_free(llm)


def max_repeats(token_ids: list[int]) -> int:
    return max(token_ids.count(t) for t in token_ids)


@pytest.mark.parametrize("penalty", [{"repetition_penalty": 1.8}, {"frequency_penalty": 2.0},
                                     {"presence_penalty": 2.0}])
def test_penalties_reduce_repetition(llm, penalty):
    # greedy "1, 2, 3," counts on and repeats ", " every other token
    plain = llm.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=24,
                                                      ignore_eos=True))[0]
    penalized = llm.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=24,
                                                          ignore_eos=True, **penalty))[0]
    assert max_repeats(plain.token_ids) >= 8
    assert max_repeats(penalized.token_ids) < max_repeats(plain.token_ids)


def test_logit_bias_bans_a_token(llm):
    plain = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=4))[0]
    banned = plain.token_ids[0]
    biased = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=4,
                                                       logit_bias={banned: -100}))[0]
    assert biased.token_ids[0] != banned
    forced = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3,
                                                       logit_bias={42: 100}))[0]
    assert forced.token_ids == [42, 42, 42]


def test_logprobs_are_model_logprobs(llm):
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3, logprobs=5))[0]
    assert len(out.logprobs) == 3
    for token, lp, top in out.logprobs:
        assert len(top) == 5 and top[0][0] == token and top[0][1] == pytest.approx(lp)
        assert all(a[1] >= b[1] for a, b in pairwise(top)) and lp <= 0


def test_prompt_logprobs_match_hf_across_prefill_chunks(model_dir, hf):
    chunked = LLM(EngineConfig(model=model_dir, max_model_len=1024, num_kv_blocks=64,
                               max_num_batched_tokens=16, max_num_seqs=4, dtype="float32"))
    prompt = chunked.tokenizer.encode(PROMPTS[2])
    assert len(prompt) > 16  # the prompt is computed in several chunks
    out = chunked.engine
    out.add_request("p", prompt, SamplingParams(max_tokens=2, prompt_logprobs=2))
    firsts = []
    while out.has_unfinished():
        firsts += [o.prompt_logprobs for o in out.step() if o.prompt_logprobs is not None]
    assert len(firsts) == 1 and len(firsts[0]) == len(prompt) and firsts[0][0] is None
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    for pos, (token, lp, top) in enumerate(firsts[0][1:], start=1):
        assert token == prompt[pos]
        assert lp == pytest.approx(ref[pos - 1, token].item(), abs=1e-3)
        assert [t for t, _ in top] == ref[pos - 1].topk(2).indices.tolist()


def test_a_one_token_prompt_has_its_one_prompt_logprob(llm):
    [token] = llm.tokenizer.encode("Hello")
    engine = llm.engine
    engine.add_request("one", [token], SamplingParams(max_tokens=3, prompt_logprobs=2))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert outputs[0].prompt_logprobs == [None]
    assert all(o.prompt_logprobs is None for o in outputs[1:])
    assert_all_blocks_free(llm)


def test_bad_input_raises_typed_errors_and_leaves_engine_clean(llm):
    engine = llm.engine
    with pytest.raises(ContextLengthError, match="1024"):
        engine.add_request("long", [1] * 1024, SamplingParams())
    with pytest.raises(ContextLengthError, match="max_tokens|1000"):
        engine.add_request("big", [1] * 100, SamplingParams(max_tokens=1000))
    for param, params in (("prompt", SamplingParams()),
                          ("logit_bias", SamplingParams(logit_bias={engine.vocab_size: 1.0})),
                          ("stop_token_ids", SamplingParams(stop_token_ids=[-1]))):
        with pytest.raises(InvalidRequestError, match="vocabulary") as error:
            engine.add_request(param, [10**9] if param == "prompt" else [1], params)
        assert error.value.param == param
    with pytest.raises(InvalidRequestError):
        SamplingParams(temperature=3)
    assert not engine.has_unfinished() and not engine.seqs
    assert llm.generate([PROMPTS[0]], SamplingParams(max_tokens=2))[0].finish_reason == "length"
    assert_all_blocks_free(llm)


def test_abort_mid_generation_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("abort-me", llm.tokenizer.encode(PROMPTS[2]),
                       SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    out = engine.abort("abort-me")
    assert out.finish_reason == "abort"
    assert not engine.has_unfinished()
    assert_all_blocks_free(llm)


def test_a_step_leaves_the_callers_floats_ieee(llm):
    # the forward flushes denormals for speed; code after it (hypothesis, numpy) must not see it
    llm.generate(["Hello"], SamplingParams(max_tokens=2))
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX"),
                    reason="flushing denormals is an x86 SSE setting")
def test_a_step_thread_flushes_denormals_in_its_parallel_ops(llm):
    smallest_normal = torch.finfo(torch.float32).tiny
    values = torch.full((1 << 20,), smallest_normal)  # large enough to split over threads

    def halve(prepare: bool, out: list) -> None:
        torch.set_flush_denormal(False)  # threads inherit the setting of the one starting them
        if prepare:
            llm.engine.runner.prepare_thread()
        out.append(values * 0.5)

    results: dict[bool, torch.Tensor] = {}
    for prepare in (False, True):  # each thread starts its own OpenMP workers
        out: list = []
        thread = threading.Thread(target=halve, args=(prepare, out))
        thread.start()
        thread.join()
        results[prepare] = out[0]
    # compared as bits: this thread may itself treat denormal inputs as zero
    assert not results[False].view(torch.int32).eq(0).any()  # denormals where nothing flushes
    assert results[True].view(torch.int32).eq(0).all()  # flushed on every worker thread too
