"""Chat rendering with the real SmolLM2 tokenizer and its Jinja template."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from app.chat import ChatTemplate
from app.errors import APIError
from app.parsers.base import parse_whole
from app.parsers.hermes import HermesParser
from app.protocol import ChatMessage, Tool


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def template(tokenizer):
    return ChatTemplate(tokenizer)


def messages(*items) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in items]


def test_matches_transformers_rendering(template, tokenizer):
    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Bye"}]
    expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                             tokenize=False)
    assert template.render(messages(*conversation)) == expected
    assert template.prompt(messages(*conversation)).token_ids() == \
        tokenizer.encode(expected, add_special_tokens=False)


def test_content_parts_join_as_text(template):
    parts = messages({"role": "user", "content": [{"type": "text", "text": "one"},
                                                  {"type": "text", "text": "two"}]})
    assert template.render(parts) == template.render(messages({"role": "user",
                                                               "content": "one\ntwo"}))


def test_image_parts_are_rejected(template):
    image = messages({"role": "user", "content": [{"type": "image_url",
                                                   "image_url": {"url": "x"}}]})
    with pytest.raises(APIError) as info:
        template.render(image)
    assert info.value.status == 400 and info.value.param == "messages.0.content"


def test_generation_prompt_and_continuation(template):
    turns = messages({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"})
    assert not template.render(turns[:1], add_generation_prompt=False).endswith("assistant\n")
    assert template.render(turns[:1]).endswith("<|im_start|>assistant\n")
    continued = template.render(turns, add_generation_prompt=False, continue_final_message=True)
    assert continued.endswith("Hel")
    with pytest.raises(APIError):
        template.render(turns[:1], add_generation_prompt=False, continue_final_message=True)


def test_tools_go_into_a_system_prompt_when_the_template_has_none(template):
    tool = Tool.model_validate({"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object"}}})
    text = template.render(messages({"role": "user", "content": "Weather?"}), tools=[tool])
    assert not template.knows_tools
    assert '"name": "get_weather"' in text and "<tool_call>" in text
    assert text.index("get_weather") < text.index("Weather?")


def test_earlier_tool_calls_render_as_parseable_text(template):
    history = messages(
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"})
    text = template.render(history)
    assistant = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    _, calls = parse_whole(HermesParser(), assistant)
    assert calls[0].name == "get_weather"
    assert "<tool_response>\nsunny\n</tool_response>" in text


def test_template_kwargs_reach_the_template(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = "{{ greeting }}|{% for m in messages %}{{ m['content'] }}{% endfor %}"
    template = ChatTemplate(tokenizer)
    turns = messages({"role": "user", "content": "x"})
    assert template.render(turns, template_kwargs={"greeting": "hello"}) == "hello|x"
    with pytest.raises(APIError) as info:  # the renderer's own arguments cannot be overridden
        template.render(turns, template_kwargs={"greeting": "hello", "tokenize": True})
    assert info.value.status == 400 and info.value.param == "chat_template_kwargs"
