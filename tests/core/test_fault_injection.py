"""The opt-in fault marker: a marked request raises inside an engine step, once, and the async
engine fails it and keeps serving; without a marker nothing is ever injected."""
from __future__ import annotations

import asyncio

import pytest

from workers.async_engine import AsyncLLMEngine
from workers.config import EngineConfig
from workers.fault_injection import FaultInjector, InjectedFault
from workers.sampling_params import SamplingParams

MARKER = "INJECT-FAULT-HERE"


class CharTokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


def ids_of(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_marked_request_raises_once_when_scheduled():
    faults = FaultInjector(MARKER, CharTokenizer())
    faults.watch("ok", ids_of("a normal prompt"))
    faults.watch("bad", ids_of(f"please {MARKER} now"))
    faults.check(["ok"])  # only batches holding the marked request raise
    with pytest.raises(InjectedFault, match="bad"):
        faults.check(["ok", "bad"])
    faults.check(["ok", "bad"])  # once


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

    async def run() -> list:
        bad = engine.tokenizer.encode(f"Please {MARKER} now.")
        with pytest.raises(InjectedFault):
            async for _ in engine.generate(bad, params, "bad"):
                pass
        assert engine.is_alive()
        ok = engine.tokenizer.encode("The sky is")
        return [out async for out in engine.generate(ok, params, "ok")]

    try:
        outs = asyncio.run(run())
        assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 4
        stats = engine.stats()
        assert stats["num_free_blocks"] == stats["num_blocks"]
    finally:
        asyncio.run(engine.shutdown(drain=False))
