"""Chat messages to prompt text with the tokenizer's Jinja chat template.

Templates that know nothing of tools get the tool list as a Hermes-style system prompt, and
earlier tool calls and results as `<tool_call>` / `<tool_response>` text, so the same parser
reads the model's answer whatever the template.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from typing import Any

import jinja2

from app.errors import bad_request
from app.parsers.mistral import TOOL_CALLS, nine_char_id
from app.protocol import ChatMessage, Tool
from app.special_tokens import Masker, SpecialTokens

TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""

# names the renderer sets itself (besides apply_chat_template's own parameters)
TEMPLATE_VARIABLES = {"messages", "tools", "documents", "add_generation_prompt"}


def reserved_kwargs(tokenizer: Any) -> frozenset[str]:
    """Names chat_template_kwargs may not use: they would collide with the renderer's own."""
    params = inspect.signature(tokenizer.apply_chat_template).parameters.values()
    named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return frozenset(named | TEMPLATE_VARIABLES)


def message_text(message: ChatMessage, index: int) -> str:
    """The text of a message whose content is a string, a list of text parts or null."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise bad_request(f"Content part type {part.type!r} is not supported; "
                              "only text parts are.", f"messages.{index}.content")
        texts.append(part.text)
    return "\n".join(texts)


def message_chars(messages: list[ChatMessage]) -> int:
    """Characters of the messages' text: enough to reject a huge prompt before rendering it."""
    total = 0
    for message in messages:
        if isinstance(message.content, str):
            total += len(message.content)
        elif message.content is not None:
            total += sum(len(part.text or "") for part in message.content)
    return total


def tool_call_text(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {arguments}}}\n</tool_call>'


def parse_arguments(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


@dataclass
class ChatPrompt:
    """Rendered chat text whose client strings are masked (see app/special_tokens.py)."""

    masked: str
    masker: Masker
    special: SpecialTokens

    @property
    def text(self) -> str:
        return self.masker.unmask(self.masked)

    def token_ids(self) -> list[int]:
        return self.special.encode(self.masked, self.masker)


class ChatTemplate:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        source = tokenizer.chat_template or ""
        self.knows_tools = "tools" in source
        self.knows_tool_calls = "tool_calls" in source
        self.nine_char_ids = TOOL_CALLS in source
        self.reserved = reserved_kwargs(tokenizer)
        self.special = SpecialTokens(tokenizer)

    def call_id(self, call_id: str | None) -> str | None:
        return nine_char_id(call_id) if self.nine_char_ids else call_id

    def conversation(self, messages: list[ChatMessage], tools: list[Tool] | None) -> list[dict]:
        conversation = []
        for i, message in enumerate(messages):
            role = "system" if message.role == "developer" else message.role
            text = message_text(message, i)
            turn: dict[str, Any] = {"role": role, "content": text}
            if message.name:
                turn["name"] = message.name
            if message.tool_calls and self.knows_tool_calls:
                turn["tool_calls"] = [
                    {"id": self.call_id(c.id), "type": "function",
                     "function": {"name": c.function.name,
                                  "arguments": parse_arguments(c.function.arguments)}}
                    for c in message.tool_calls]
            elif message.tool_calls:
                calls = [tool_call_text(c.function.name, c.function.arguments)
                         for c in message.tool_calls]
                turn["content"] = "\n".join(([text] if text else []) + calls)
            if role == "tool" and self.knows_tools:
                turn["tool_call_id"] = self.call_id(message.tool_call_id)
            elif role == "tool":
                turn = {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"}
            conversation.append(turn)
        if tools and not self.knows_tools:
            conversation = self.with_tools_prompt(conversation, tools)
        return conversation

    def with_tools_prompt(self, conversation: list[dict], tools: list[Tool]) -> list[dict]:
        listing = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in tools)
        prompt = TOOLS_PROMPT.format(tools=listing)
        if conversation and conversation[0]["role"] == "system":
            first = conversation[0]
            return [{**first, "content": f"{first['content']}\n\n{prompt}"}, *conversation[1:]]
        return [{"role": "system", "content": prompt}, *conversation]

    def render(self, messages: list[ChatMessage], tools: list[Tool] | None = None,
               add_generation_prompt: bool = True, continue_final_message: bool = False,
               template_kwargs: dict[str, Any] | None = None) -> str:
        if not messages:
            raise bad_request("messages must contain at least one message.", "messages")
        if self.tokenizer.chat_template is None:
            raise bad_request("This model has no chat template; use /v1/completions.")
        if add_generation_prompt and continue_final_message:
            raise bad_request("add_generation_prompt and continue_final_message cannot both "
                              "be true.", "continue_final_message")
        if continue_final_message and messages[-1].role != "assistant":
            raise bad_request("continue_final_message needs a final assistant message.",
                              "continue_final_message")
        kwargs = dict(template_kwargs or {})
        taken = sorted(self.reserved.intersection(kwargs))
        if taken:
            raise bad_request(f"chat_template_kwargs cannot set {', '.join(taken)}: the "
                              "server sets these itself.", "chat_template_kwargs")
        tool_dicts = [t.model_dump(exclude_none=True) for t in tools] if tools else None
        try:
            return self.tokenizer.apply_chat_template(
                self.conversation(messages, tools),
                tools=tool_dicts if self.knows_tools else None,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
                **kwargs,
            )
        except jinja2.TemplateError as e:
            raise bad_request(f"The chat template could not render these messages: {e}",
                              "messages") from e

    def prompt(self, messages: list[ChatMessage], tools: list[Tool] | None = None,
               add_generation_prompt: bool = True, continue_final_message: bool = False,
               template_kwargs: dict[str, Any] | None = None) -> ChatPrompt:
        """The prompt of a request: rendered with every client string masked, so only the
        template's own special tokens parse as such."""
        masker = self.special.masker()
        try:
            messages = [ChatMessage.model_validate(masker.mask(m.model_dump(exclude_unset=True)))
                        for m in messages]
            tools = [Tool.model_validate(masker.mask(t.model_dump(exclude_unset=True)))
                     for t in tools] if tools else None
        except RecursionError as e:
            raise bad_request("The messages or tools are nested too deeply.", "messages") from e
        masked = self.render(messages, tools, add_generation_prompt, continue_final_message,
                             masker.mask(template_kwargs or {}))
        return ChatPrompt(masked, masker, self.special)
