"""One tool call whose payload is a JSON object `{"name": ..., "arguments": {...}}` (or
"parameters"), streamed as it is written: a header once the name is known, then the arguments'
text in fragments, so the fragments of a finished call join to its arguments."""
from __future__ import annotations

import json

from app.parsers.events import CallArguments, CallStart, Event, new_call_id
from app.parsers.json_scan import scan_payload


class ToolCallStream:
    def __init__(self, index: int, call_id: str | None = None) -> None:
        self.index = index
        self.id = call_id or new_call_id()
        self.payload = ""
        self.name: str | None = None
        self.arguments = ""  # sent so far
        self.closed = False

    def add(self, text: str) -> list[Event]:
        self.payload += text
        return self.advance()

    def advance(self) -> list[Event]:
        scan = scan_payload(self.payload)
        if scan.name is None or scan.args_start is None:
            return []
        events: list[Event] = []
        if self.name is None:
            self.name = scan.name
            events.append(CallStart(self.index, self.id, scan.name))
        if self.payload[scan.args_start] == '"':
            # arguments written as a JSON string: its decoded value is the arguments text
            if scan.args_end is not None and not self.arguments:
                value = json.loads(self.payload[scan.args_start:scan.args_end])
                events += self.send(value if isinstance(value, str) else "")
            return events
        end = scan.args_end if scan.args_end is not None else len(self.payload)
        return events + self.send(self.payload[scan.args_start + len(self.arguments):end])

    def close(self) -> list[Event]:
        """The payload is over; a call with a name but no arguments gets `{}`."""
        self.closed = True
        events = self.advance()
        scan = scan_payload(self.payload)
        if self.name is None and scan.name is not None:
            self.name = scan.name
            events.append(CallStart(self.index, self.id, scan.name))
        if self.name is not None and not self.arguments and scan.args_start is None:
            events += self.send("{}")
        return events

    def send(self, fragment: str) -> list[Event]:
        if not fragment:
            return []
        self.arguments += fragment
        return [CallArguments(self.index, fragment)]

    def well_formed(self) -> bool:
        """The payload is a complete JSON object with a string name."""
        try:
            payload = json.loads(self.payload)
        except json.JSONDecodeError:
            return False
        return isinstance(payload, dict) and isinstance(payload.get("name"), str)


class JsonObjectReader:
    """Finds where a JSON object (or array) that starts at its opening bracket ends, across
    deltas: bracket depth counted outside strings."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False

    def read(self, text: str) -> int | None:
        """Index just after the end of the value in `text`, or None if it goes on."""
        for i, char in enumerate(text):
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif char == "\\":
                    self.escape = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None
