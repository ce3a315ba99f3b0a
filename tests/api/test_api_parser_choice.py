"""Which parsers a model folder gets: from its chat template and model_type, or the Serve args."""
from __future__ import annotations

import pytest
from families import template_text

from app.parsers.registry import UnknownParserError, choose_parsers
from app.settings import ApiConfig

TOOLS_TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}{{ tools | tojson }}"


@pytest.mark.parametrize("family,model_type,tool", [
    ("hermes", "qwen2", "hermes"), ("mistral", "mistral", "mistral"),
    ("llama3_json", "llama", "llama3_json"), ("qwen3", "qwen3", "hermes")])
def test_tool_parser_from_the_template(family, model_type, tool):
    choice = choose_parsers(model_type, template_text(family))
    assert choice.tool == tool and "template" in choice.reason


def test_a_template_without_tools_gets_the_hermes_prompt(model_dir):
    with open(f"{model_dir}/chat_template.jinja") as f:
        choice = choose_parsers("llama", f.read())
    assert (choice.tool, choice.reasoning) == ("hermes", None)


def test_model_type_decides_when_the_template_names_no_format():
    assert choose_parsers("mistral", TOOLS_TEMPLATE).tool == "mistral"
    unknown = choose_parsers("gemma3", TOOLS_TEMPLATE)
    assert unknown.tool is None and "only forced calls" in unknown.reason


def test_reasoning_parser_from_the_template():
    assert choose_parsers("qwen2", template_text("deepseek_r1")).reasoning == "think"
    assert choose_parsers("qwen3", template_text("qwen3")).reasoning == "think"
    assert choose_parsers("mistral", template_text("mistral")).reasoning is None


def test_serve_args_override():
    choice = choose_parsers("llama", template_text("llama3_json"), "hermes", "deepseek_r1")
    assert (choice.tool, choice.reasoning) == ("hermes", "deepseek_r1")
    assert choose_parsers("qwen2", template_text("deepseek_r1"), "none", "none").reasoning is None
    with pytest.raises(UnknownParserError):
        choose_parsers("llama", "", "pythonic")
    with pytest.raises(ValueError):
        ApiConfig(tool_parser="pythonic")


def test_per_request_parsers():
    choice = choose_parsers("mistral", template_text("mistral"))
    assert choice.for_request(True, False, "").keeps_special_tokens
    assert choice.for_request(True, True, "").tool == "forced"
    assert not choice.for_request(True, True, "").keeps_special_tokens
    assert choice.for_request(False, False, "").tool_parser() is None
    r1 = choose_parsers("qwen2", template_text("deepseek_r1"))
    assert r1.for_request(False, False, "<｜Assistant｜><think>\n").starts_inside
