"""Llama 3.x JSON tool calls: `{"name": ..., "parameters": {...}}`, after `<|python_tag|>` or
alone at the start of a line, one or several separated by `;` or newlines.

A `{` at the start of a line is held back until its first key is read: a call's first key is
"name"; any other object is content.
"""
from __future__ import annotations

from app.parsers.base import StepParser
from app.parsers.call import JsonObjectReader
from app.parsers.events import Event
from app.parsers.tags import partial_tag_length

PYTHON_TAG = "<|python_tag|>"
NAME_KEY = '"name"'
LAYOUT = " \t\r\n;"  # between calls


def first_key_is_name(rest: str) -> bool | None:
    """Whether the object whose text after `{` is `rest` starts with the key "name"; None
    while too little of it is known."""
    rest = rest.lstrip()
    if len(rest) < len(NAME_KEY):
        return None if NAME_KEY.startswith(rest) else False
    return rest.startswith(NAME_KEY)


def line_start_brace(text: str, line_start: bool) -> int:
    """Index of the first `{` with only spaces before it on its line, or -1."""
    for i, char in enumerate(text):
        if char == "{" and line_start:
            return i
        if char == "\n":
            line_start = True
        elif char not in " \t\r":
            line_start = False
    return -1


class Llama3JsonParser(StepParser):
    name = "llama3_json"
    needs_special_tokens = True

    def __init__(self) -> None:
        super().__init__()  # modes: "text", "between" (calls) or "object"
        self.line_start = True  # the content sent so far ends a line (or is empty)
        self.marker = ""  # a <|python_tag|> not yet followed by a call
        self.layout = ""  # text between calls, not yet known to be only layout
        self.reader = JsonObjectReader()

    def steps(self):
        return {"text": self.in_text, "between": self.between, "object": self.in_object}

    def flush(self) -> list[Event]:
        events = self.run(final=True)
        if self.mode == "object":
            events += self.end_call(self.marker)  # cut off before its end
        elif self.marker:
            events += self.text(self.marker + self.layout)
        self.buffer = self.marker = self.layout = ""
        return events

    def send(self, events: list[Event], text: str) -> None:
        if text:
            events += self.text(text)
            self.line_start = line_start_brace(text + "{", self.line_start) == len(text)

    def in_text(self, events: list[Event], final: bool) -> bool:
        tag = self.buffer.find(PYTHON_TAG)
        brace = line_start_brace(self.buffer, self.line_start)
        if tag >= 0 and (brace < 0 or tag < brace):
            self.send(events, self.buffer[:tag])
            self.buffer = self.buffer[tag + len(PYTHON_TAG):]
            self.marker, self.layout, self.mode = PYTHON_TAG, "", "between"
            return True
        if brace >= 0:
            self.send(events, self.buffer[:brace])
            self.buffer = self.buffer[brace:]
            is_call = first_key_is_name(self.buffer[1:])
            if is_call is None and not final:
                return False  # hold the `{` until its first key is known
            if not is_call:
                self.send(events, "{")
                self.buffer = self.buffer[1:]
                return True
            self.start_object()
            return True
        held = 0 if final else partial_tag_length(self.buffer, PYTHON_TAG)
        self.send(events, self.buffer[:len(self.buffer) - held])
        self.buffer = self.buffer[len(self.buffer) - held:]
        return False

    def between(self, events: list[Event], final: bool) -> bool:
        stripped = self.buffer.lstrip(LAYOUT)
        self.layout += self.buffer[:len(self.buffer) - len(stripped)]
        self.buffer = stripped
        if not stripped:
            return False
        if stripped[0] == "{":
            self.start_object()
            return True
        # not a call: back to content, with the marker and layout as the model wrote them
        self.mode = "text"
        pending, self.marker, self.layout = self.marker + self.layout, "", ""
        self.line_start = False
        self.send(events, pending)
        return True

    def start_object(self) -> None:
        self.start_call()
        self.reader = JsonObjectReader()
        self.mode, self.layout = "object", ""

    def in_object(self, events: list[Event], final: bool) -> bool:
        end = self.reader.read(self.buffer)
        if end is None:
            events += self.calls[-1].add(self.buffer)
            self.buffer = ""
            return False
        events += self.calls[-1].add(self.buffer[:end])
        self.buffer = self.buffer[end:]
        events += self.end_call(self.marker)
        self.marker = ""
        self.mode = "between"
        return True
