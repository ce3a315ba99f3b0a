"""Responses input to a chat request: items (earlier turns first) to chat messages, and the
request's tools, tool_choice and text.format to their Chat Completions equivalents, so the
chat generation path (template, grammar, parsers) serves both APIs."""
from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from app.errors import bad_request
from app.params import check_schema
from app.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    JsonSchemaFormat,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolCall,
)
from app.responses.protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItem,
    InputPart,
    MessageItem,
    ResponsesRequest,
    UnsupportedItem,
)

TEXT_PARTS = {"input_text", "output_text", "text"}
ITEMS: TypeAdapter[list[InputItem]] = TypeAdapter(list[InputItem])


def request_items(request: ResponsesRequest) -> list[dict]:
    """This request's input as stored item dicts (a string is one user message)."""
    if isinstance(request.input, str):
        return [{"type": "message", "role": "user", "content": request.input}]
    return [item.model_dump(mode="json", exclude_none=True) for item in request.input]


def parts_text(content: str | list[InputPart], param: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        if part.type == "refusal":
            continue
        if part.type not in TEXT_PARTS or part.text is None:
            raise bad_request(f"Content of type {part.type!r} is not supported; only text is.",
                              f"{param}.{i}.type")
        texts.append(part.text)
    return "\n".join(texts)


def to_messages(instructions: str | None, items: list[dict],
                first_new: int) -> list[ChatMessage]:
    """Chat messages of a conversation; `first_new` is where this request's items start, so
    errors name their position in `input`."""
    messages = [ChatMessage(role="system", content=instructions)] if instructions else []
    for i, item in enumerate(ITEMS.validate_python(items)):
        param = f"input.{i - first_new}" if i >= first_new else "previous_response_id"
        last = messages[-1] if messages else None
        if isinstance(item, MessageItem):
            text = parts_text(item.content, f"{param}.content")
            messages.append(ChatMessage(role=item.role, content=text))
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name,
                                                                   arguments=item.arguments))
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            messages.append(ChatMessage(role="tool", tool_call_id=item.call_id,
                                        content=parts_text(item.output, f"{param}.output")))
        elif isinstance(item, UnsupportedItem):
            raise bad_request(f"Input items of type {item.type!r} are not supported.",
                              f"{param}.type")
    if not messages:
        raise bad_request("input must contain at least one item.", "input")
    return messages


def response_format(request: ResponsesRequest) -> ResponseFormat | None:
    spec = request.text.format
    if spec.type == "text":
        return None
    if spec.type == "json_object":
        return ResponseFormat(type="json_object")
    if spec.json_schema is None:
        raise bad_request("text.format of type json_schema needs a schema.", "text.format.schema")
    check_schema(spec.json_schema, "text.format.schema")
    return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(
        name=spec.name or "response", schema=spec.json_schema, strict=spec.strict))


def chat_request(request: ResponsesRequest, messages: list[ChatMessage]) -> ChatCompletionRequest:
    choice: Any = request.tool_choice
    if not isinstance(choice, str):
        choice = NamedToolChoice(function=NamedFunction(name=choice.name))
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    if forced and request.text.format.type != "text":
        raise bad_request("text.format cannot be combined with a forced tool_choice.",
                          "text.format")
    tools = [Tool(function=FunctionDefinition(name=t.name, description=t.description,
                                              parameters=t.parameters))
             for t in request.tools or []]
    kwargs = {}
    if request.reasoning is not None and request.reasoning.effort is not None:
        kwargs["reasoning_effort"] = request.reasoning.effort
    return ChatCompletionRequest(
        model=request.model, messages=messages, tools=tools or None,
        tool_choice=choice if tools or forced else None,
        parallel_tool_calls=request.parallel_tool_calls,
        response_format=response_format(request), max_completion_tokens=request.max_output_tokens,
        temperature=request.temperature, top_p=request.top_p, user=request.user,
        stream=request.stream, chat_template_kwargs=kwargs or None)
