"""Incremental detokenization: UTF-8 safe, stop strings held back across tokens."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from workers.engine.detokenizer import Detokenizer


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("text", ["Héllo wörld — 你好，世界! 🐉🔥 done",
                                  "  leading spaces\nnew line"])
def test_incremental_equals_full_decode_and_never_emits_partial_chars(tokenizer, text):
    ids = tokenizer.encode(text)
    d = Detokenizer(tokenizer, [], stop=[])
    out = ""
    for t in ids:
        d.add_token(t)
        delta = d.take(finished=False)
        assert "\ufffd" not in delta
        out += delta
    out += d.take(finished=True)
    assert out == tokenizer.decode(ids)


def test_stop_string_across_tokens_is_cut_and_never_emitted(tokenizer):
    text = "alpha beta gamma delta"
    ids = tokenizer.encode(text)
    d = Detokenizer(tokenizer, [], stop=["a gam"])
    emitted, matched = "", None
    for t in ids:
        matched = d.add_token(t)
        emitted += d.take(finished=matched is not None)
        if matched:
            break
    assert matched == "a gam"
    assert emitted == "alpha bet"
