"""The async engine: streamed deltas, abort on consumer exit, back-pressure, fault recovery."""
from __future__ import annotations

import asyncio

import pytest

from workers.engine.async_engine import AsyncLLMEngine
from workers.engine.config import EngineConfig
from workers.engine.errors import ContextLengthError, QueueFullError
from workers.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = AsyncLLMEngine(EngineConfig(model=model_dir, max_model_len=512, num_kv_blocks=128,
                                      max_waiting_requests=4))
    yield eng
    asyncio.run(eng.shutdown(drain=False))


async def wait_idle(engine: AsyncLLMEngine) -> dict:
    for _ in range(100):
        stats = engine.stats()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"engine did not go idle: {engine.stats()}")


async def collect(engine, ids, params, rid):
    outs = [o async for o in engine.generate(ids, params, rid)]
    return outs


async def test_stream_matches_offline_engine(engine):
    ids = engine.tokenizer.encode("The capital of France is")
    outs = await collect(engine, ids, SamplingParams(temperature=0, max_tokens=12,
                                                     ignore_eos=True), "a")
    assert [o.finish_reason for o in outs[:-1]] == [None] * (len(outs) - 1)
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 12
    tokens = [t for o in outs for t in o.token_ids]
    assert "".join(o.text for o in outs) == engine.tokenizer.decode(tokens)


async def test_slow_consumer_gets_waiting_deltas_merged(engine):
    ids = engine.tokenizer.encode("Count slowly:")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    fast = await collect(engine, ids, params, "fast")
    slow = []
    async for out in engine.generate(ids, params, "slow"):
        slow.append(out)
        await asyncio.sleep(0.3)  # several engine steps land while this consumer sleeps
    assert len(slow) < len(fast) == 16
    assert [t for o in slow for t in o.token_ids] == [t for o in fast for t in o.token_ids]
    assert "".join(o.text for o in slow) == "".join(o.text for o in fast)
    assert [e[0] for o in slow for e in o.logprobs] == [t for o in slow for t in o.token_ids]
    assert slow[-1].finish_reason == "length" and slow[-1].completion_tokens == 16


async def test_consumer_leaving_aborts_and_frees_blocks(engine):
    ids = engine.tokenizer.encode("Tell me a long story about a dragon.")
    gen = engine.generate(ids, SamplingParams(max_tokens=200, ignore_eos=True), "leaver")
    async for out in gen:
        if out.completion_tokens >= 3:
            break
    await gen.aclose()
    stats = await wait_idle(engine)
    assert stats["num_free_blocks"] == stats["num_blocks"]


async def test_bad_request_raises_before_streaming(engine):
    with pytest.raises(ContextLengthError):
        await collect(engine, [1] * 600, SamplingParams(), "too-long")
    assert engine.is_alive()


async def test_queue_full_is_reported(engine):
    ids = engine.tokenizer.encode("Count to one hundred:")
    engine._stats = {**engine.stats(), "num_waiting": 4}  # as the engine thread would report
    with pytest.raises(QueueFullError):
        await collect(engine, ids, SamplingParams(max_tokens=2), "full")
    await wait_idle(engine)


async def test_failing_step_fails_its_requests_and_engine_recovers(engine):
    ids = engine.tokenizer.encode("Hello")
    runner = engine.engine.runner
    original = runner.execute

    def explode(batch):
        runner.execute = original
        raise RuntimeError("injected fault")

    runner.execute = explode
    with pytest.raises(RuntimeError, match="injected fault"):
        await collect(engine, ids, SamplingParams(max_tokens=4), "doomed")
    assert engine.is_alive()
    outs = await collect(engine, ids, SamplingParams(max_tokens=4, ignore_eos=True), "after")
    assert outs[-1].finish_reason == "length"
    stats = await wait_idle(engine)
    assert stats["num_free_blocks"] == stats["num_blocks"]


async def test_concurrent_requests_share_steps(engine):
    ids = engine.tokenizer.encode("List three colors:")
    start = engine.step_count
    results = await asyncio.gather(*[
        collect(engine, ids, SamplingParams(temperature=0.8, seed=i, max_tokens=10,
                                            ignore_eos=True), f"c{i}") for i in range(4)])
    assert all(r[-1].completion_tokens == 10 for r in results)
    assert engine.step_count - start < 4 * 10  # batched, not one request after another


async def test_a_schema_is_compiled_once_off_the_event_loop_and_engine_thread(engine,
                                                                             monkeypatch):
    import json
    import threading

    from workers.engine.grammar import GrammarCompiler

    threads: list[str] = []
    compile_schema = GrammarCompiler.compile

    def spy(self, schema=None, ebnf=None):
        threads.append(threading.current_thread().name)
        return compile_schema(self, schema, ebnf)

    monkeypatch.setattr(GrammarCompiler, "compile", spy)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    ids = engine.tokenizer.encode("A JSON object with a number:")
    outs = await collect(engine, ids, SamplingParams(temperature=0, max_tokens=24,
                                                     json_schema=schema), "schema")
    assert isinstance(json.loads("".join(o.text for o in outs))["n"], int)
    assert len(threads) == 1
    assert threads[0] not in (threading.current_thread().name, "pagoda-engine")


async def test_outputs_reach_the_loop_once_per_step_and_are_built_there(engine, monkeypatch):
    import threading

    from workers.engine.step_outputs import StepOutputs

    builders: set[str] = set()
    build = StepOutputs.build

    def spy(self):
        builders.add(threading.current_thread().name)
        return build(self)

    monkeypatch.setattr(StepOutputs, "build", spy)
    loop = asyncio.get_running_loop()
    handoffs = 0
    call_soon_threadsafe = loop.call_soon_threadsafe

    def counted(*args, **kwargs):
        nonlocal handoffs
        handoffs += 1
        return call_soon_threadsafe(*args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
    ids = engine.tokenizer.encode("Name a fruit:")
    start = engine.step_count
    results = await asyncio.gather(*[
        collect(engine, ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                f"h{i}") for i in range(6)])
    steps = engine.step_count - start
    assert all(r[-1].completion_tokens == 8 for r in results)
    assert len({tuple(t for o in r for t in o.token_ids) for r in results}) == 1  # greedy
    assert builders == {threading.current_thread().name}  # the loop's, not the engine's
    assert handoffs <= steps < 6 * 8  # one hand-off per step, not one per output
