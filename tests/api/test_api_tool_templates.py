"""Each family's chat template through `apply_chat_template`: tools and earlier calls rendered,
the assistant turn the template writes read back by the family's parser, tool results rendered
with their call's id (9 alphanumeric characters for Mistral)."""
from __future__ import annotations

import json

import pytest
from families import family_tokenizer
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk
from parser_helpers import assemble, stream, whole

from app.chat import ChatTemplate
from app.chat_output import delta_message
from app.errors import APIError
from app.parsers.mistral import nine_char_id
from app.parsers.registry import TOOL_PARSERS, choose_parsers
from app.protocol import ChatMessage, Tool
from app.streaming import ChatChunks

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
TOOLS = [Tool.model_validate(t) for t in (WEATHER_TOOL, TIME_TOOL)]
FAMILIES = ["hermes", "mistral", "llama3_json"]
EOS = {"hermes": "<|im_end|>", "mistral": "</s>", "llama3_json": "<|eot_id|>"}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, model_dir):
    tokenizer = family_tokenizer(request.param, model_dir)
    return request.param, tokenizer, ChatTemplate(tokenizer)


def messages(*items: dict) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in items]


def call(call_id: str, name: str, args: dict) -> dict:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}


USER = {"role": "user", "content": "Weather in Paris, and the time there?"}


def assistant_turn(template: ChatTemplate, eos: str, *calls: dict, content: str | None = None
                   ) -> str:
    """What the model writes for an assistant turn: the template's text for it, up to EOS."""
    before = template.render(messages(USER), TOOLS, add_generation_prompt=True)
    turn = {"role": "assistant", "content": content, "tool_calls": list(calls)}
    after = template.render(messages(USER, turn), TOOLS, add_generation_prompt=False)
    assert after.startswith(before)
    return after[len(before):].split(eos)[0]


def test_the_family_is_detected_from_the_template(family):
    name, tokenizer, _ = family
    assert choose_parsers(None, tokenizer.chat_template).tool == name


def test_tools_are_rendered_into_the_prompt(family):
    _, _, template = family
    prompt = template.render(messages(USER), TOOLS)
    assert template.knows_tools and "get_weather" in prompt and "Current weather" in prompt
    assert prompt.index("get_weather") < prompt.rindex("Weather in Paris")


def test_a_rendered_call_parses_back(family):
    name, _, template = family
    output = assistant_turn(template, EOS[name], call("call_1", "get_weather", {"city": "Paris"}))
    content, calls = whole(TOOL_PARSERS[name](), output)
    assert content is None
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris"})]
    cut_everywhere = assemble(stream(TOOL_PARSERS[name](), output, list(range(len(output)))))
    assert cut_everywhere[1] == calls


def test_rendered_calls_survive_tokenization(family):
    """Token by token, with special tokens kept as the ingress asks for these families."""
    name, tokenizer, template = family
    output = assistant_turn(template, EOS[name], call("call_1", "get_weather", {"city": "Rome"}))
    pieces = [tokenizer.decode([t], skip_special_tokens=False)
              for t in tokenizer.encode(output, add_special_tokens=False)]
    parser = TOOL_PARSERS[name]()
    events = [e for piece in pieces for e in parser.feed(piece)] + parser.flush()
    assert assemble(events)[1] == [{"name": "get_weather", "arguments": '{"city": "Rome"}'}]


def test_several_calls(family):
    name, _, template = family
    calls = (call("call_1", "get_weather", {"city": "Paris"}),
             call("call_2", "get_time", {"zone": "Europe/Paris"}))
    if name == "llama3_json":  # Llama 3.1's template allows one call per turn
        with pytest.raises(APIError) as info:
            assistant_turn(template, EOS[name], *calls)
        assert info.value.status == 400
        output = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; ' \
                 '{"name": "get_time", "parameters": {"zone": "Europe/Paris"}}'
    else:
        output = assistant_turn(template, EOS[name], *calls)
    _, parsed = whole(TOOL_PARSERS[name](), output)
    assert [c["name"] for c in parsed] == ["get_weather", "get_time"]
    assert json.loads(parsed[1]["arguments"]) == {"zone": "Europe/Paris"}


CALL_AFTER_TEXT = {
    "hermes": 'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    "mistral": 'Let me check.[TOOL_CALLS] [{"name": "get_time", "arguments": {}}]',
    "llama3_json": 'Let me check.<|python_tag|>{"name": "get_time", "parameters": {}}',
}


def test_calls_after_text(family):
    name, _, template = family
    if name == "hermes":  # Qwen's template writes the text before the calls itself
        assert assistant_turn(template, EOS[name], call("c", "get_time", {}),
                              content="Let me check.") == CALL_AFTER_TEXT[name]
    content, calls = whole(TOOL_PARSERS[name](), CALL_AFTER_TEXT[name])
    assert content == "Let me check." and [c["name"] for c in calls] == ["get_time"]


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_truncated_calls_are_content(family, cut):
    name, _, template = family
    output = assistant_turn(template, EOS[name], call("call_1", "get_weather", {"city": "Oslo"}))
    truncated = output[:int(len(output) * cut)]
    assert whole(TOOL_PARSERS[name](), truncated) == (truncated, [])


def test_tool_results_render_with_their_call(family):
    name, _, template = family
    history = messages(USER, {"role": "assistant", "content": None, "tool_calls": [
        call("call_x7", "get_weather", {"city": "Paris"})]},
        {"role": "tool", "tool_call_id": "call_x7", "content": "18 C, sunny"})
    prompt = template.render(history, TOOLS)
    assert "18 C, sunny" in prompt
    if name == "mistral":  # both the call and its result carry the derived 9-character id
        short = nine_char_id("call_x7")
        assert len(short) == 9 and short.isalnum() and prompt.count(f'"{short}"') == 2
        assert '"call_x7"' not in prompt


def test_mistral_ids_are_kept_when_valid_and_derived_alike_otherwise():
    assert nine_char_id("a1B2c3D4e") == "a1B2c3D4e"
    assert nine_char_id("call_1") == nine_char_id("call_1") != nine_char_id("call_2")


def test_openai_stream_helper_accumulates_the_calls(family):
    """The SDK's own accumulation of our chunks gives the whole response's calls."""
    name, _, template = family
    calls = (call("a", "get_weather", {"city": "Paris"}),) if name == "llama3_json" else (
        call("a", "get_weather", {"city": "Paris"}), call("b", "get_time", {}))
    output = assistant_turn(template, EOS[name], *calls)
    chunks = ChatChunks("chatcmpl-1", 0, "m")
    events = [chunks.role(0)]
    events += [chunks.delta(0, delta_message(e))
               for e in stream(TOOL_PARSERS[name](), output, list(range(0, len(output), 3)))]
    events.append(chunks.finish(0, "tool_calls"))
    state = ChatCompletionStreamState()
    for sse in events:
        chunk = json.loads(sse.removeprefix("data: "))
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    message = state.get_final_completion().choices[0].message
    _, expected = whole(TOOL_PARSERS[name](), output)
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == \
        [(c["name"], c["arguments"]) for c in expected]
    assert all(c.id.startswith("call_") for c in message.tool_calls)
