"""One chat choice's output as it streams in: parsers for reasoning and tool calls, the
logprobs not sent yet, and the usage counts."""
from __future__ import annotations

from app.parsers.base import parse_whole
from app.parsers.events import CallStart, Event, Reasoning, Text
from app.parsers.reasoning import split_reasoning
from app.parsers.registry import RequestParsers
from app.protocol import DeltaMessage, FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta
from workers.engine.outputs import RequestOutput, TokenLogprob


def delta_message(event: Event) -> DeltaMessage:
    if isinstance(event, Text):
        return DeltaMessage(content=event.text)
    if isinstance(event, Reasoning):
        return DeltaMessage(reasoning_content=event.text)
    if isinstance(event, CallStart):
        return DeltaMessage(tool_calls=[ToolCallDelta(
            index=event.index, id=event.id, type="function",
            function=FunctionCallDelta(name=event.name, arguments=""))])
    return DeltaMessage(tool_calls=[ToolCallDelta(
        index=event.index, function=FunctionCallDelta(arguments=event.fragment))])


class ChoiceOutput:
    def __init__(self, index: int, parsers: RequestParsers) -> None:
        self.index = index
        self.parsers = parsers
        self.reasoning = parsers.reasoning_parser()
        self.tools = parsers.tool_parser()
        self.text = ""
        self.logprobs: list[TokenLogprob] = []
        self.unsent_logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.cached_tokens = 0

    def record(self, out: RequestOutput) -> None:
        self.text += out.text
        if out.logprobs:
            self.logprobs += out.logprobs
            self.unsent_logprobs += out.logprobs
        self.completion_tokens = out.completion_tokens
        self.cached_tokens = out.cached_tokens
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason

    def take_logprobs(self) -> list[TokenLogprob]:
        taken, self.unsent_logprobs = self.unsent_logprobs, []
        return taken

    # streaming

    def feed(self, text: str) -> list[DeltaMessage]:
        if not text:
            return []
        events = self.reasoning.feed(text) if self.reasoning else [Text(text)]
        return [delta_message(e) for e in self.through_tools(events)]

    def flush(self) -> list[DeltaMessage]:
        events = self.through_tools(self.reasoning.flush()) if self.reasoning else []
        events += self.tools.flush() if self.tools else []
        return [delta_message(e) for e in events]

    def through_tools(self, events: list[Event]) -> list[Event]:
        if self.tools is None:
            return events
        out: list[Event] = []
        for event in events:
            out += self.tools.feed(event.text) if isinstance(event, Text) else [event]
        return out

    def streamed_finish_reason(self) -> str:
        has_calls = self.tools is not None and bool(self.tools.tool_calls())
        return self.openai_finish_reason(has_calls)

    # whole response

    def message_parts(self) -> tuple[str | None, str | None, list[ToolCall]]:
        """(reasoning_content, content, tool_calls) of the finished text."""
        reasoning_parser = self.parsers.reasoning_parser()
        reasoning, content = (split_reasoning(reasoning_parser, self.text) if reasoning_parser
                              else (None, self.text))
        tool_parser = self.parsers.tool_parser()
        if tool_parser is None:
            return reasoning, content, []
        rest, parsed = parse_whole(tool_parser, content)
        calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                 for c in parsed]
        return reasoning, rest, calls

    def openai_finish_reason(self, has_calls: bool) -> str:
        reason = self.finish_reason or "abort"
        return "tool_calls" if has_calls and reason == "stop" else reason
