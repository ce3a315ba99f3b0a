"""Tokenizers and random-weight model folders for the model families we deploy, built from the
SmolLM2 tokenizer: the family's special tokens added, its EOS and chat template set. The
templates in templates/ are test templates written in each family's format."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

TEMPLATES = os.path.join(os.path.dirname(__file__), "templates")


@dataclass(frozen=True)
class Family:
    template: str
    model_type: str
    special: tuple[str, ...]  # special tokens (dropped by skip_special_tokens)
    plain: tuple[str, ...] = ()  # tokens of their own that decode like text
    bos: str | None = None
    eos: str = "<|im_end|>"


FAMILIES = {
    "hermes": Family("qwen_hermes.jinja", "qwen2", (), ("<tool_call>", "</tool_call>")),
    "mistral": Family("mistral.jinja", "mistral",
                      ("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                       "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
                      bos="<s>", eos="</s>"),
    "llama3_json": Family("llama3.jinja", "llama",
                          ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"),
                          bos="<|begin_of_text|>", eos="<|eot_id|>"),
    "deepseek_r1": Family("deepseek_r1.jinja", "qwen2",
                          ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                           "<｜Assistant｜>"), ("<think>", "</think>"),
                          bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>"),
    "qwen3": Family("qwen3.jinja", "qwen2", (), ("<think>", "</think>")),
}


def template_text(name: str) -> str:
    with open(os.path.join(TEMPLATES, FAMILIES[name].template)) as f:
        return f.read()


def family_tokenizer(name: str, base_dir: str):
    family = FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.add_tokens(list(family.special), special_tokens=True)
    tokenizer.add_tokens(list(family.plain))
    tokenizer.eos_token = family.eos
    if family.bos:
        tokenizer.bos_token = family.bos
    tokenizer.chat_template = template_text(name)
    return tokenizer


def random_model(name: str, base_dir: str, out: str) -> str:
    """A tiny random-weight model of the family's architecture with its tokenizer, in `out`."""
    family = FAMILIES[name]
    tokenizer = family_tokenizer(name, base_dir)
    config = AutoConfig.for_model(
        family.model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_type"] == family.model_type
    return out
