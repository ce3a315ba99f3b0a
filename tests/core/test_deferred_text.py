"""Text decoded when read: requests without stop strings get no text work in the engine loop,
and their outputs' texts equal those of the eager path, in any order they are read."""
from __future__ import annotations

import pickle
from dataclasses import replace

import pytest
from transformers import AutoTokenizer

from workers.engine.config import EngineConfig
from workers.engine.detokenizer import Detokenizer
from workers.engine.llm_engine import LLMEngine
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams

TEXT = " Héllo wörld — 你好，世界! 🐉🔥 done\n  and more"
NEVER = "\x00never"  # a stop string that never matches: the eager path (deltas held back)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def test_deferred_claims_equal_eager_deltas_read_in_any_order(tokenizer):
    prompt = tokenizer.encode("Say it:")
    ids = tokenizer.encode(TEXT)
    eager = Detokenizer(tokenizer, prompt, stop=[])
    deltas = []
    for t in ids:
        eager.add_token(t)
        deltas.append(eager.take(finished=False))
    deferred = Detokenizer(tokenizer, prompt, stop=[])
    source: list[int] = []
    deferred.defer(source)
    claims = []
    for t in ids:
        source.append(t)
        claims.append(deferred.claim(len(source)))
    assert deferred.text == ""  # nothing decoded before a read
    texts = {i: RequestOutput("r", deferred_text=c).text for i, c in reversed(list(
        enumerate(claims)))}
    assert [texts[i] for i in range(len(ids))] == deltas
    assert "".join(deltas) == tokenizer.decode(ids)


def test_an_unclaimed_final_token_adds_no_text(tokenizer):
    d = Detokenizer(tokenizer, [], stop=[])
    source = tokenizer.encode("one two")
    d.defer(source)
    new = tokenizer.encode(" three four five")
    source += new
    first = RequestOutput("r", deferred_text=d.claim(len(source) - 1))
    assert d.claim(len(source) - 1) is None  # the stop token: no text of its own
    assert first.text == tokenizer.decode(new[:-1])


@pytest.fixture(scope="module")
def engine(model_dir):
    return LLMEngine(EngineConfig(model=model_dir, dtype="float32", max_model_len=256))


def run(engine: LLMEngine, params: SamplingParams) -> list[RequestOutput]:
    engine.add_request("r", engine.tokenizer.encode("Write a poem about the sea:"), params)
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    return outputs


@pytest.mark.slow
def test_engine_outputs_defer_text_and_match_the_eager_path(engine):
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    eager = [o.text for o in run(engine, replace(plain, stop=[NEVER]))]
    deferred = run(engine, plain)
    assert all(o.deferred_text is not None for o in deferred if o.token_ids)
    texts = [o.text for o in reversed(deferred)][::-1]
    assert "".join(texts) == "".join(eager) and sum(map(bool, texts)) > 12
    # a stop token ends it: its own text is in no output, with or without stop strings
    stop_token = deferred[10].token_ids[0]
    stopped = replace(plain, stop_token_ids=[stop_token])
    with_stop = [o.text for o in run(engine, replace(stopped, stop=[NEVER]))]
    without = run(engine, stopped)
    assert without[-1].finish_reason == "stop"
    assert "".join(o.text for o in without) == "".join(with_stop)
    first = [o.token_ids[0] for o in deferred].index(stop_token)
    assert len(without) == len(with_stop) == first + 1
    # an output sent to another process carries its text
    copy = pickle.loads(pickle.dumps(run(engine, plain)[3]))
    assert copy.text == texts[3] and copy.deferred_text is None


@pytest.mark.slow
@pytest.mark.parametrize("stop", [[], [NEVER]])
def test_outputs_read_after_later_steps_equal_those_read_at_once(engine, stop):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1,
                            prompt_logprobs=1, stop=stop)

    def fields(outputs: list[RequestOutput]) -> list[tuple]:
        return [(o.token_ids, o.text, o.completion_tokens, o.finish_reason, o.logprobs,
                 o.prompt_logprobs) for o in outputs]

    at_once = fields(run(engine, params))
    engine.add_request("r", engine.tokenizer.encode("Write a poem about the sea:"), params)
    steps = []
    while engine.has_unfinished():
        steps.append(engine.step())  # none read until the request has finished
    assert fields([o for step in steps for o in step]) == at_once
    assert [o.completion_tokens for o in run(engine, params)] == list(range(1, 13))
