"""A request resumed from the output it already produced continues exactly where it stopped:
the same tokens, the same text from the first unsent character, the same usage and logprobs,
with penalties, min_tokens, stop strings and seeds treating the resumed tokens as output."""
from __future__ import annotations

import dataclasses

import pytest

from workers.engine.config import EngineConfig
from workers.engine.errors import ContextLengthError, InvalidRequestError
from workers.engine.llm_engine import LLMEngine
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import PriorOutput, SamplingParams

pytestmark = pytest.mark.slow

COUNTING = "1, 2, 3,"
STORY = "Once upon a time, a fox and a crow"
CHINESE = "请用中文写一首关于月亮的短诗："


@pytest.fixture(scope="module")
def engine(model_dir):
    # exact equality needs float32: in bf16 a re-prefill and the decodes it replaces round apart
    return LLMEngine(EngineConfig(model=model_dir, max_model_len=512, num_kv_blocks=256,
                                  num_threads=1, dtype="float32"))


def run_all(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]
            ) -> dict[str, list[RequestOutput]]:
    """Every request to completion, batched together; each one's outputs in order."""
    outputs: dict[str, list[RequestOutput]] = {}
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
        outputs[request_id] = []
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
        assert not engine.failed
    return outputs


def run(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[RequestOutput]:
    return run_all(engine, {"full": (prompt, params)})["full"]


def resume_at(engine: LLMEngine, prompt: list[int], params: SamplingParams,
              full: list[RequestOutput], points: list[int]) -> dict[int, list[RequestOutput]]:
    """The request again from each point k, as a client that received full[:k] resumes it."""
    requests = {}
    for k in points:
        sent = full[:k]
        prior = PriorOutput([t for o in sent for t in o.token_ids],
                            sum(len(o.text) for o in sent))
        requests[f"resumed-{k}"] = (prompt, dataclasses.replace(params, prior_output=prior))
    outputs = run_all(engine, requests)
    return {k: outputs[f"resumed-{k}"] for k in points}


def check_continues(full: list[RequestOutput], k: int, rest: list[RequestOutput]) -> None:
    assert [t for o in rest for t in o.token_ids] == [t for o in full[k:] for t in o.token_ids]
    assert "".join(o.text for o in full[:k]) + "".join(o.text for o in rest) == \
        "".join(o.text for o in full)
    last, expected = rest[-1], full[-1]
    assert last.finish_reason == expected.finish_reason
    assert (last.prompt_tokens, last.completion_tokens) == (expected.prompt_tokens,
                                                            expected.completion_tokens)
    assert last.cached_tokens <= last.prompt_tokens
    if expected.logprobs is not None:
        got = [e for o in rest for e in o.logprobs]
        want = [e for o in full[k:] for e in o.logprobs]
        assert [e[0] for e in got] == [e[0] for e in want]
        for (_, lp, top), (_, lp_want, top_want) in zip(got, want, strict=True):
            assert lp == pytest.approx(lp_want, abs=1e-3)
            assert [t for t, _ in top] == [t for t, _ in top_want]


def assert_all_blocks_free(engine: LLMEngine) -> None:
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.seqs


@pytest.mark.parametrize("prompt, extra", [
    (COUNTING, {"repetition_penalty": 1.3, "frequency_penalty": 0.6, "presence_penalty": 0.4}),
    (STORY, {"frequency_penalty": 1.5, "logprobs": 3}),
    (CHINESE, {"repetition_penalty": 1.2}),  # multi-byte characters split across tokens
])
def test_greedy_resume_at_every_point_equals_the_uninterrupted_run(engine, prompt, extra):
    ids = engine.tokenizer.encode(prompt)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **extra)
    full = run(engine, ids, params)
    assert len(full) == 16
    for k, rest in resume_at(engine, ids, params, full, list(range(1, 16))).items():
        check_continues(full, k, rest)
    assert_all_blocks_free(engine)


def test_penalties_see_the_resumed_tokens_as_output(engine):
    """Without them the penalty would not apply and the continuation would differ."""
    ids = engine.tokenizer.encode(COUNTING)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                            frequency_penalty=1.0)
    full = run(engine, ids, params)
    sent = [t for o in full[:6] for t in o.token_ids]
    as_prompt = run(engine, ids + sent, dataclasses.replace(params, max_tokens=14))
    rest = resume_at(engine, ids, params, full, [6])[6]
    expected = [t for o in full[6:] for t in o.token_ids]
    assert [t for o in rest for t in o.token_ids] == expected
    assert [t for o in as_prompt for t in o.token_ids] != expected
    assert_all_blocks_free(engine)


def test_stop_string_held_back_across_the_resume_point(engine):
    ids = engine.tokenizer.encode(STORY)
    plain = run(engine, ids, SamplingParams(temperature=0, max_tokens=30))
    text = "".join(o.text for o in plain)
    stop = text[len(text) * 2 // 3:][:6]  # matched late, held back in every delta before it
    params = SamplingParams(temperature=0, max_tokens=30, stop=[stop, "a string never seen"])
    full = run(engine, ids, params)
    assert full[-1].finish_reason == "stop"
    assert "".join(o.text for o in full) == text[:text.index(stop)]
    for k, rest in resume_at(engine, ids, params, full, list(range(1, len(full)))).items():
        check_continues(full, k, rest)
    assert_all_blocks_free(engine)


def test_min_tokens_counts_the_resumed_tokens(engine):
    chat = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi"}], add_generation_prompt=True, tokenize=False))
    ended = run(engine, chat, SamplingParams(temperature=0, max_tokens=64))
    length = sum(len(o.token_ids) for o in ended)
    assert ended[-1].finish_reason == "stop"
    params = SamplingParams(temperature=0, max_tokens=64, min_tokens=length + 4)
    full = run(engine, chat, params)
    for k, rest in resume_at(engine, chat, params, full, [1, length - 1, length + 2]).items():
        check_continues(full, k, rest)
    assert_all_blocks_free(engine)


def test_seeded_sampling_resumes_the_same_draws(engine):
    ids = engine.tokenizer.encode(STORY)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=11, max_tokens=20,
                            ignore_eos=True)
    full = run(engine, ids, params)
    for k, rest in resume_at(engine, ids, params, full, [1, 9, 19]).items():
        check_continues(full, k, rest)
    assert_all_blocks_free(engine)


def test_resume_hits_the_prefix_cache_of_prompt_and_output(engine):
    ids = engine.tokenizer.encode(STORY * 4)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = run(engine, ids, params)
    hits = engine.block_manager.prefix_hits
    computed, execute = [], engine.runner.execute
    engine.runner.execute = lambda batch: computed.append(batch.num_tokens) or execute(batch)
    try:
        rest = resume_at(engine, ids, params, full, [36])[36]
    finally:
        engine.runner.execute = execute
    check_continues(full, 36, rest)
    bs = engine.config.block_size
    # the cache served the output blocks too; usage and stats count prompt tokens only
    cached = (len(ids) + 36 - 1) // bs * bs  # full blocks, the last token always computed
    assert cached > len(ids)
    assert computed[0] == len(ids) + 36 - cached
    assert rest[-1].cached_tokens == len(ids)
    assert engine.block_manager.prefix_hits - hits == len(ids)
    assert_all_blocks_free(engine)


def test_impossible_resumes_are_typed_errors(engine):
    ids = engine.tokenizer.encode(COUNTING)
    with pytest.raises(InvalidRequestError):
        SamplingParams(max_tokens=4, prior_output=PriorOutput([1, 2, 3, 4], 0))
    with pytest.raises(InvalidRequestError):
        SamplingParams(prompt_logprobs=1, prior_output=PriorOutput([1], 0))
    with pytest.raises(InvalidRequestError):
        engine.add_request("bad", ids, SamplingParams(
            max_tokens=8, prior_output=PriorOutput([engine.vocab_size], 0)))
    with pytest.raises(ContextLengthError):
        engine.add_request("long", ids, SamplingParams(
            max_tokens=None, prior_output=PriorOutput([1] * (512 - len(ids)), 0)))
    assert_all_blocks_free(engine)
