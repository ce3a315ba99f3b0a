"""What every tool-call parser shares: the calls found so far, content between them, text given
back when a payload turns out not to be a call, and whole-output parsing on top of streaming."""
from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from app.parsers.call import ToolCallStream
from app.parsers.events import Event, ParsedCall, Text


class ToolParser:
    """Feed text deltas, get events in order; `flush` once the output has ended.

    Subclasses read one model family's call format. `needs_special_tokens`: the family marks
    calls with special tokens (`[TOOL_CALLS]`, `<|python_tag|>`), so the detokenizer must keep
    them in the text.
    """

    name: ClassVar[str] = ""
    needs_special_tokens: ClassVar[bool] = False

    def __init__(self) -> None:
        self.calls: list[ToolCallStream] = []

    def feed(self, text: str) -> list[Event]:
        raise NotImplementedError

    def flush(self) -> list[Event]:
        raise NotImplementedError

    def text(self, text: str) -> list[Event]:
        # whitespace between and after calls is layout, not an answer
        if not text or (self.calls and text.isspace()):
            return []
        return [Text(text)]

    def start_call(self, call_id: str | None = None) -> ToolCallStream:
        call = ToolCallStream(len(self.calls), call_id)
        self.calls.append(call)
        return call

    def end_call(self, before: str = "", after: str = "") -> list[Event]:
        """Close the last call; one that never named a function goes back as text, with the
        markers around it (`before`, `after`) as the model wrote them."""
        call = self.calls[-1]
        events = call.close()
        if call.name is None:
            self.calls.pop()
            events.append(Text(f"{before}{call.payload}{after}"))
        return events

    def tool_calls(self) -> list[ParsedCall]:
        return [ParsedCall(c.id, c.name, c.arguments) for c in self.calls if c.name is not None]

    def well_formed(self) -> bool:
        return all(call.well_formed() for call in self.calls)


class StepParser(ToolParser):
    """A parser that reads its buffer in modes: each mode's step takes what it can from the
    buffer, adds events, and says whether to go on (False: it waits for more text)."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = ""
        self.mode = "text"

    def steps(self) -> dict[str, Callable[[list[Event], bool], bool]]:
        raise NotImplementedError

    def feed(self, text: str) -> list[Event]:
        self.buffer += text
        return self.run(final=False)

    def run(self, final: bool) -> list[Event]:
        events: list[Event] = []
        steps = self.steps()
        while self.buffer and steps[self.mode](events, final):
            pass
        return events


def parse_whole(parser: ToolParser, text: str) -> tuple[str | None, list[ParsedCall]]:
    """Whole output to (content, calls); a malformed call leaves all of it as content."""
    events = parser.feed(text) + parser.flush()
    calls = parser.tool_calls()
    if not calls or not parser.well_formed():
        return text, []
    content = "".join(e.text for e in events if isinstance(e, Text)).strip()
    return content or None, calls

