"""Hermes-style tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

Streaming follows OpenAI: a call's first delta carries index, id, type, name and
`arguments: ""`; later deltas carry argument fragments. The arguments of a finished call are the
concatenation of its fragments, so streamed and whole responses agree.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from app.parsers.json_scan import scan_payload
from app.parsers.tags import TagSplitter
from app.protocol import DeltaMessage, FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class CallState:
    index: int
    id: str
    payload: str = ""
    name: str | None = None
    arguments: str = ""  # sent so far
    args_from_string: bool = False  # arguments came as a JSON string, sent once complete
    closed: bool = False


class ToolParser:
    """Feed text deltas; get content and tool-call deltas in order.

    `forced`: the output is one bare payload without tags (tool_choice required or named,
    where decoding is constrained to the payload's schema).
    """

    def __init__(self, forced: bool = False) -> None:
        self.splitter = TagSplitter(TOOL_OPEN, TOOL_CLOSE, inside=forced)
        self.calls: list[CallState] = []
        if forced:
            self.calls.append(CallState(index=0, id=new_call_id()))

    def feed(self, text: str) -> list[DeltaMessage]:
        return self.convert(self.splitter.feed(text), final=False)

    def flush(self) -> list[DeltaMessage]:
        return self.convert(self.splitter.flush(), final=True)

    def convert(self, pieces: list, final: bool) -> list[DeltaMessage]:
        deltas: list[DeltaMessage] = []
        for piece in pieces:
            if piece.kind == "outside":
                # whitespace between calls is layout, not an answer
                if not (self.calls and piece.text.isspace()):
                    deltas.append(DeltaMessage(content=piece.text))
            elif piece.kind == "open":
                self.calls.append(CallState(index=len(self.calls), id=new_call_id()))
            elif piece.kind == "inside":
                self.calls[-1].payload += piece.text
                deltas += self.advance(self.calls[-1])
            else:
                deltas += self.close(self.calls[-1], tagged=True)
        if final and self.calls and not self.calls[-1].closed:
            deltas += self.close(self.calls[-1], tagged=False)
        return deltas

    def advance(self, call: CallState) -> list[DeltaMessage]:
        scan = scan_payload(call.payload)
        if scan.name is None or scan.args_start is None:
            return []
        deltas = []
        if call.name is None:
            call.name = scan.name
            deltas.append(tool_delta(call, name=scan.name, arguments=""))
        if call.payload[scan.args_start] == '"':
            # arguments written as a JSON string: its decoded value is the arguments text
            call.args_from_string = True
            if scan.args_end is not None and not call.arguments:
                value = json.loads(call.payload[scan.args_start:scan.args_end])
                deltas.append(self.send(call, value if isinstance(value, str) else ""))
            return deltas
        end = scan.args_end if scan.args_end is not None else len(call.payload)
        fragment = call.payload[scan.args_start + len(call.arguments):end]
        if fragment:
            deltas.append(self.send(call, fragment))
        return deltas

    def close(self, call: CallState, tagged: bool) -> list[DeltaMessage]:
        """End a call, at its closing tag or (tagged=False) at the end of the output."""
        call.closed = True
        deltas = self.advance(call)
        scan = scan_payload(call.payload)
        if call.name is None and scan.name is not None:
            # a call without arguments
            call.name = scan.name
            deltas.append(tool_delta(call, name=scan.name, arguments=""))
        if call.name is not None and not call.arguments and scan.args_start is None:
            deltas.append(self.send(call, "{}"))
        if call.name is None:
            # not a tool call after all: give the text back
            self.calls.pop()
            closing = TOOL_CLOSE if tagged else ""
            deltas.append(DeltaMessage(content=f"{TOOL_OPEN}{call.payload}{closing}"))
        return deltas

    def send(self, call: CallState, fragment: str) -> DeltaMessage:
        call.arguments += fragment
        return tool_delta(call, arguments=fragment)

    def tool_calls(self) -> list[ToolCall]:
        return [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                for c in self.calls if c.name is not None]

    def well_formed(self) -> bool:
        """Every call's payload is a complete JSON object with a string name."""
        for call in self.calls:
            try:
                payload = json.loads(call.payload)
            except json.JSONDecodeError:
                return False
            if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
                return False
        return True


def tool_delta(call: CallState, name: str | None = None,
               arguments: str | None = None) -> DeltaMessage:
    header = name is not None
    function = FunctionCallDelta(name=name, arguments=arguments)
    return DeltaMessage(tool_calls=[ToolCallDelta(
        index=call.index, id=call.id if header else None, type="function" if header else None,
        function=function)])


def parse_tool_calls(text: str, forced: bool = False) -> tuple[str | None, list[ToolCall]]:
    """Whole output to (content, tool calls); malformed calls leave all of it as content."""
    parser = ToolParser(forced=forced)
    deltas = parser.feed(text) + parser.flush()
    calls = parser.tool_calls()
    if not calls or not parser.well_formed():
        return text, []
    content = "".join(d.content for d in deltas if d.content is not None).strip()
    return content or None, calls
