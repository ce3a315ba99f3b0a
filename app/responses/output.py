"""One generation's deltas (content, reasoning, tool calls) to Responses output items, with the
stream events OpenAI sends for each: an item is added, its part opened, its deltas sent, then
part and item are done before the next item starts. Whole responses run the same builder, so
streamed and whole outputs agree."""
from __future__ import annotations

from app.protocol import DeltaMessage, ToolCallDelta
from app.responses.protocol import (
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputReasoning,
    OutputText,
    ReasoningText,
    Status,
)

Event = dict  # a stream event without its sequence_number


class OutputBuilder:
    def __init__(self, parallel_tool_calls: bool = True) -> None:
        self.items: list[OutputItem] = []
        self.current: OutputItem | None = None
        self.held = ""  # whitespace that may only separate items, not yet part of a message
        self.parallel_tool_calls = parallel_tool_calls
        self.calls: dict[int, OutputFunctionCall | None] = {}  # tool-call index -> item or dropped

    def feed(self, delta: DeltaMessage) -> list[Event]:
        events: list[Event] = []
        if delta.reasoning_content:
            events += self.reasoning(delta.reasoning_content)
        if delta.content:
            events += self.text(delta.content)
        for call in delta.tool_calls or []:
            events += self.tool_call(call)
        return events

    def finish(self, status: Status) -> list[Event]:
        """Close the last item; an output with no item at all is one (maybe empty) message."""
        events = [] if self.items else self.start(OutputMessage())
        if isinstance(self.current, OutputMessage) and self.held:
            events += self.text_delta(self.current, self.held)
        self.held = ""
        return events + self.close(status)

    @property
    def index(self) -> int:
        return len(self.items) - 1

    def text(self, text: str) -> list[Event]:
        if isinstance(self.current, OutputMessage):
            return self.text_delta(self.current, text)
        if text.isspace():
            self.held += text
            return []
        message = OutputMessage()
        events = self.close("completed") + self.start(message)
        text, self.held = self.held + text, ""
        return events + self.text_delta(message, text)

    def text_delta(self, message: OutputMessage, text: str) -> list[Event]:
        message.content[0].text += text
        return [{"type": "response.output_text.delta", **self.where(), "content_index": 0,
                 "delta": text, "logprobs": []}]

    def reasoning(self, text: str) -> list[Event]:
        events: list[Event] = []
        item = self.current
        if not isinstance(item, OutputReasoning):
            self.held = ""
            item = OutputReasoning()
            events += self.close("completed") + self.start(item)
        item.content[0].text += text
        return events + [{"type": "response.reasoning_text.delta", **self.where(),
                          "content_index": 0, "delta": text}]

    def tool_call(self, delta: ToolCallDelta) -> list[Event]:
        function = delta.function
        if delta.index not in self.calls:
            if not self.parallel_tool_calls and any(self.calls.values()):
                self.calls[delta.index] = None  # one call only: later ones are dropped
                return []
            self.held = ""
            assert delta.id is not None and function is not None and function.name is not None, \
                "a call's first delta names it"
            item = OutputFunctionCall(call_id=delta.id, name=function.name)
            self.calls[delta.index] = item
            return self.close("completed") + self.start(item)
        call = self.calls[delta.index]
        if call is None or not function or not function.arguments:
            return []
        call.arguments += function.arguments
        return [{"type": "response.function_call_arguments.delta", **self.where(),
                 "delta": function.arguments}]

    def where(self) -> dict:
        assert self.current is not None, "deltas go to an open item"
        return {"item_id": self.current.id, "output_index": self.index}

    def start(self, item: OutputItem) -> list[Event]:
        self.items.append(item)
        self.current = item
        events: list[Event] = [{"type": "response.output_item.added", "output_index": self.index,
                                "item": item.model_dump(mode="json")}]
        if isinstance(item, OutputMessage):
            item.content.append(OutputText())
        elif isinstance(item, OutputReasoning):
            item.content.append(ReasoningText())
        else:
            return events
        events.append({"type": "response.content_part.added", **self.where(),
                       "content_index": 0, "part": item.content[0].model_dump(mode="json")})
        return events

    def close(self, status: Status) -> list[Event]:
        item = self.current
        if item is None:
            return []
        events: list[Event] = []
        if isinstance(item, OutputFunctionCall):
            events.append({"type": "response.function_call_arguments.done", **self.where(),
                           "arguments": item.arguments})
        else:
            part = item.content[0]
            kind = "output_text" if isinstance(item, OutputMessage) else "reasoning_text"
            done = {"type": f"response.{kind}.done", **self.where(), "content_index": 0,
                    "text": part.text}
            if isinstance(item, OutputMessage):
                done["logprobs"] = []
            events += [done, {"type": "response.content_part.done", **self.where(),
                              "content_index": 0, "part": part.model_dump(mode="json")}]
        item.status = status
        events.append({"type": "response.output_item.done", "output_index": self.index,
                       "item": item.model_dump(mode="json")})
        self.current = None
        return events

    def reasoning_text(self) -> str:
        return "".join(i.content[0].text for i in self.items if isinstance(i, OutputReasoning))
