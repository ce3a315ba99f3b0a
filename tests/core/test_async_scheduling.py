"""Overlapped steps (async_scheduling) give the outputs of plain steps, on the real model.

On CPU the forward is synchronous, so nothing overlaps in time, but the engine runs the
overlapped order: step N+1 is scheduled and launched with step N's tokens still unread (its
decode inputs taken from N's sampled tensor), and N's tokens are detokenized and stop-checked
one step behind. Each case runs the same requests both ways, in float32, greedy.
"""
from __future__ import annotations

import gc
import logging
import weakref

import pytest

from bench.roofline import StepRecorder
from workers.engine.config import EngineConfig
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

SHARED = ("You are a careful assistant. Answer briefly and precisely, and say when you do not "
          "know. Questions follow, one per line, each about a different topic. ")
PROMPTS = {
    "a": "The capital of France is",
    "b": SHARED + "What is the boiling point of water?",
    "c": "def fibonacci(n):",
    "d": "Once upon a time, in a land far away, there lived a young girl who",
    "e": SHARED + "Who wrote Hamlet?",  # joins later: hits b's cached prefix
}


def engine(model_dir: str, overlap: bool, **kwargs) -> LLMEngine:
    kwargs.setdefault("num_kv_blocks", 256)  # on a GPU the default takes most free memory
    config = EngineConfig(model=model_dir, dtype="float32", max_model_len=512,
                          async_scheduling=overlap, **kwargs)
    return LLMEngine(config)


def drive(eng: LLMEngine, requests: dict[str, SamplingParams], events=()) -> dict[str, dict]:
    """Run to the end. events: (watched id, tokens it has, action, request id); an action
    fires once the watched request has that many output tokens, the same point both ways."""
    tok = eng.tokenizer
    results = {rid: {"tokens": [], "text": "", "finish": None} for rid in PROMPTS}
    pending = list(events)
    for rid, params in requests.items():
        eng.add_request(rid, tok.encode(PROMPTS[rid]), params)
    while eng.has_unfinished() or pending:
        for out in eng.step():
            r = results[out.request_id]
            r["tokens"] += out.token_ids
            r["text"] += out.text
            r["finish"] = out.finish_reason or r["finish"]
        for event in [e for e in pending if len(results[e[0]]["tokens"]) >= e[1]]:
            pending.remove(event)
            _, _, action, rid = event
            if action == "abort":
                results[rid]["finish"] = eng.abort(rid).finish_reason
            else:
                eng.add_request(rid, tok.encode(PROMPTS[rid]), action)
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not eng.overlapped
    return {rid: r for rid, r in results.items() if r["finish"] is not None}


@pytest.fixture(scope="module")
def stop_string(model_dir) -> str:
    """A piece of d's greedy text, found by running it (so the stop string surely matches)."""
    eng = engine(model_dir, overlap=False)
    text = drive(eng, {"d": SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)})
    return text["d"]["text"][20:26]


def test_mixed_batch_matches_plain_steps(model_dir, stop_string):
    greedy = dict(temperature=0, ignore_eos=True)
    requests = {
        "a": SamplingParams(max_tokens=30, logprobs=2, **greedy),
        "b": SamplingParams(max_tokens=20, **greedy),
        "c": SamplingParams(max_tokens=40, **greedy),  # aborted after 6 tokens
        "d": SamplingParams(max_tokens=24, stop=[stop_string], **greedy),
    }
    events = [("a", 3, SamplingParams(max_tokens=12, **greedy), "e"), ("c", 6, "abort", "c")]
    results, engines = [], []
    for overlap in (False, True):
        # a 32-token budget: the longer prompts prefill in chunks beside running decodes
        eng = engine(model_dir, overlap, max_num_batched_tokens=32, max_num_seqs=8,
                     num_kv_blocks=128)
        results.append(drive(eng, requests, events))
        engines.append(eng)
    plain, overlapped = results
    assert engines[1].async_scheduling and not engines[0].async_scheduling
    assert overlapped == plain
    assert plain["c"]["finish"] == "abort" and len(plain["c"]["tokens"]) == 6
    assert plain["d"]["finish"] == "stop" and stop_string not in plain["d"]["text"]
    assert [len(plain[r]["tokens"]) for r in "abe"] == [30, 20, 12]
    for eng in engines:
        assert eng.block_manager.prefix_hits > 0  # e reused b's prompt blocks


def test_preemption_matches_plain_steps(model_dir):
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    requests = {rid: params for rid in "abcd"}
    results, preemptions = [], []
    for overlap in (False, True):
        # 14 blocks of 16 tokens cannot hold four requests of ~20 + 48 tokens at once
        eng = engine(model_dir, overlap, num_kv_blocks=14, max_num_seqs=4)
        results.append(drive(eng, requests))
        preemptions.append(eng.scheduler.num_preemptions)
    assert results[1] == results[0]
    assert min(preemptions) > 0
    assert all(len(r["tokens"]) == 48 for r in results[0].values())


def test_overlap_reads_tokens_one_step_behind(model_dir):
    """The first step of a lone request returns its token only on the next step."""
    for overlap, first_step in ((False, 1), (True, 0)):
        eng = engine(model_dir, overlap)
        eng.add_request("a", eng.tokenizer.encode(PROMPTS["a"]),
                        SamplingParams(temperature=0, max_tokens=2))
        assert len(eng.step()) == first_step
        assert bool(eng.overlapped) == overlap


def test_defaults_and_limits(model_dir):
    assert not EngineConfig(model=model_dir).overlap_steps("cpu")
    assert EngineConfig(model=model_dir).overlap_steps("cuda")
    assert EngineConfig(model=model_dir, tensor_parallel_size=2).overlap_steps("cuda")
    assert not EngineConfig(model=model_dir, pipeline_parallel_size=2).overlap_steps("cuda")
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(model=model_dir, async_scheduling=True, pipeline_parallel_size=2)


def test_a_dropped_overlapped_engine_is_freed_at_once(model_dir):
    """No reference cycle: the next engine on a GPU sizes its KV cache from free memory."""
    eng = engine(model_dir, True)
    freed = weakref.ref(eng)
    gc.disable()
    try:
        del eng
        assert freed() is None
    finally:
        gc.enable()


def test_the_benchmark_records_overlapped_steps_without_falling_back(model_dir, caplog):
    eng = engine(model_dir, True)
    recorder = StepRecorder()
    recorder.attach(eng.runner)
    requests = {k: SamplingParams(temperature=0, max_tokens=6) for k in ("a", "c")}
    with caplog.at_level(logging.WARNING, logger="pagoda.engine"):
        results = drive(eng, requests)
    assert not caplog.records
    assert all(len(results[rid]["tokens"]) == 6 for rid in requests)
    # a prefill step, then one step per further token (the last one's token is dropped)
    assert len(recorder.steps) >= 6
    assert all(n == 1 for rows in recorder.steps[1:] for n, _, _ in rows)
