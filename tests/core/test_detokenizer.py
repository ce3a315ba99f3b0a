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


class WindowOnly:
    """The tokenizer without its Rust backend: the detokenizer decodes windows instead."""

    def __init__(self, tokenizer) -> None:
        self.decode = tokenizer.decode


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_and_window_decoding_agree(tokenizer, skip_special_tokens):
    prompt = tokenizer.encode("Say it:")
    ids = tokenizer.encode(" Héllo wörld — 你好 🐉") + [tokenizer.eos_token_id] + \
        tokenizer.encode("\n  done ünd")
    texts = []
    for tok in (tokenizer, WindowOnly(tokenizer)):
        d = Detokenizer(tok, prompt, stop=[], skip_special_tokens=skip_special_tokens)
        assert (d.stream is not None) == (tok is tokenizer)
        for t in ids:
            d.add_token(t)
        texts.append(d.take(finished=True))
    assert texts[0] == texts[1]
    assert texts[0].startswith(" Héllo")
