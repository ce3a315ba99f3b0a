"""The opt-in fault marker: a marked request raises inside every engine step it is in; the engine
isolates it, fails it alone and keeps serving the rest; without a marker nothing is injected."""
from __future__ import annotations

import asyncio

import pytest

from workers.engine.async_engine import AsyncLLMEngine
from workers.engine.config import EngineConfig
from workers.engine.fault_injection import FaultInjector, InjectedFault
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

MARKER = "INJECT-FAULT-HERE"


class CharTokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


def ids_of(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_marked_request_raises_whenever_scheduled():
    faults = FaultInjector(MARKER, CharTokenizer())
    faults.watch("ok", ids_of("a normal prompt"))
    faults.watch("bad", ids_of(f"please {MARKER} now"))
    faults.check(["ok"])  # only batches holding the marked request raise
    with pytest.raises(InjectedFault, match="bad"):
        faults.check(["ok", "bad"])
    with pytest.raises(InjectedFault, match="bad"):
        faults.check(["bad"])  # again, until it is forgotten
    faults.forget("bad")
    faults.check(["ok", "bad"])


def test_no_marker_injects_nothing_and_forgotten_requests_do_not_raise():
    silent = FaultInjector(None, CharTokenizer())
    silent.watch("bad", ids_of(f"please {MARKER} now"))
    silent.check(["bad"])
    faults = FaultInjector(MARKER, CharTokenizer())
    faults.watch("bad", ids_of(MARKER))
    faults.forget("bad")  # aborted before it was scheduled
    faults.check(["bad"])


@pytest.mark.slow
def test_async_engine_fails_the_marked_request_and_keeps_serving(model_dir):
    engine = AsyncLLMEngine(EngineConfig(model=model_dir, max_model_len=256, num_kv_blocks=64,
                                         fault_marker=MARKER))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def collect(text: str, request_id: str) -> list:
        ids = engine.tokenizer.encode(text)
        return [out async for out in engine.generate(ids, params, request_id)]

    async def run() -> list:
        # the faulty request is batched with healthy ones; only it fails
        results = await asyncio.gather(
            collect("The sky is", "ok-0"), collect(f"Please {MARKER} now.", "bad"),
            collect("One, two, three,", "ok-1"), return_exceptions=True)
        assert engine.is_alive()
        for _ in range(100):  # stats are a snapshot the engine thread refreshes
            stats = engine.stats()
            if stats["num_free_blocks"] == stats["num_blocks"]:
                break
            await asyncio.sleep(0.05)
        assert stats["num_free_blocks"] == stats["num_blocks"], stats
        return results

    try:
        first, bad, second = asyncio.run(run())
        assert isinstance(bad, InjectedFault)
        for outs in (first, second):
            assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 4
    finally:
        asyncio.run(engine.shutdown(drain=False))


@pytest.mark.slow
def test_engine_fails_only_the_faulty_request_of_a_batch(model_dir):
    config = {"model": model_dir, "max_model_len": 256, "num_kv_blocks": 64}
    engine = LLMEngine(EngineConfig(**config, fault_marker=MARKER))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = {f"ok-{i}": engine.tokenizer.encode(text) for i, text in enumerate(
        ["The sky is", "One, two, three,", "Paris is the capital of", "def add(a, b):",
         "Water boils at", "The quick brown fox"])}
    prompts["bad"] = engine.tokenizer.encode(f"Please {MARKER} now.")
    for request_id, ids in prompts.items():
        engine.add_request(request_id, ids, params)
    tokens: dict[str, list[int]] = {}
    failed = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        failed += engine.failed
    assert [request_id for request_id, _ in failed] == ["bad"]
    assert isinstance(failed[0][1], InjectedFault)
    assert engine.block_manager.num_free_blocks == engine.runner.num_blocks

    clean = LLMEngine(EngineConfig(**config))  # the same requests, without the faulty one
    for request_id, ids in prompts.items():
        if request_id != "bad":
            clean.add_request(request_id, ids, params)
    expected: dict[str, list[int]] = {}
    while clean.has_unfinished():
        for out in clean.step():
            expected.setdefault(out.request_id, []).extend(out.token_ids)
    assert tokens == expected
