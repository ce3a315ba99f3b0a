"""One chat choice's output as it streams in: parsers for reasoning and tool calls, the
logprobs not sent yet, and the usage counts."""
from __future__ import annotations

from app.parsers.reasoning_parser import ReasoningParser, split_reasoning
from app.parsers.tool_parser import ToolParser, parse_tool_calls
from app.protocol import DeltaMessage, ToolCall
from workers.engine.outputs import RequestOutput, TokenLogprob


class ChoiceOutput:
    def __init__(self, index: int, reasoning: bool, tools: bool, forced_tool: bool) -> None:
        self.index = index
        self.reasoning = ReasoningParser() if reasoning else None
        self.tools = ToolParser(forced=forced_tool) if tools else None
        self.forced_tool = forced_tool
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
        deltas = self.reasoning.feed(text) if self.reasoning else [DeltaMessage(content=text)]
        return self.through_tools(deltas)

    def flush(self) -> list[DeltaMessage]:
        deltas = self.through_tools(self.reasoning.flush()) if self.reasoning else []
        return deltas + (self.tools.flush() if self.tools else [])

    def through_tools(self, deltas: list[DeltaMessage]) -> list[DeltaMessage]:
        if self.tools is None:
            return deltas
        out: list[DeltaMessage] = []
        for delta in deltas:
            out += self.tools.feed(delta.content) if delta.content is not None else [delta]
        return out

    def streamed_finish_reason(self) -> str:
        has_calls = self.tools is not None and bool(self.tools.tool_calls())
        return self.openai_finish_reason(has_calls)

    # whole response

    def message_parts(self) -> tuple[str | None, str | None, list[ToolCall]]:
        """(reasoning_content, content, tool_calls) of the finished text."""
        reasoning, content = split_reasoning(self.text) if self.reasoning else (None, self.text)
        calls: list[ToolCall] = []
        if self.tools is not None:
            content, calls = parse_tool_calls(content, forced=self.forced_tool)
        return reasoning, content, calls

    def openai_finish_reason(self, has_calls: bool) -> str:
        reason = self.finish_reason or "abort"
        return "tool_calls" if has_calls and reason == "stop" else reason
