"""Mistral tool calls after the `[TOOL_CALLS]` token, in either of Mistral's formats:

- a JSON list, `[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": "a1b2c3d4e"}, ...]`,
  with or without ids (the response gives calls ids of its own);
- a call per marker, `[TOOL_CALLS]name[ARGS]{...}`, or
  `[TOOL_CALLS]name[CALL_ID]a1b2c3d4e[ARGS]{...}` whose id becomes the call's id.
"""
from __future__ import annotations

import hashlib
import json
import re
import string

from app.parsers.base import StepParser
from app.parsers.call import JsonObjectReader
from app.parsers.events import Event
from app.parsers.tags import partial_tag_length

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
NAME = re.compile(r"[A-Za-z0-9_.\-]+")
LAYOUT = " \t\r\n,"
ALPHANUMERIC = string.ascii_letters + string.digits


class MistralParser(StepParser):
    name = "mistral"
    needs_special_tokens = True

    def __init__(self) -> None:
        super().__init__()  # modes: "text", "between" (calls), "named" or "object"
        self.markup = ""  # markers and layout read since the last call, given back if no call
        self.in_list = False
        self.named_call = False  # the object being read is a `[ARGS]` value, not a payload
        self.reader = JsonObjectReader()

    def steps(self):
        return {"text": self.in_text, "between": self.between, "named": self.named,
                "object": self.in_object}

    def flush(self) -> list[Event]:
        events = self.run(final=True)
        if self.mode == "object":
            events += self.end_call(self.markup)  # cut off before its end
        elif self.mode != "text":
            events += self.text(self.markup + self.buffer)
        self.buffer = self.markup = ""
        return events

    def in_text(self, events: list[Event], final: bool) -> bool:
        pos = self.buffer.find(TOOL_CALLS)
        if pos < 0:
            held = 0 if final else partial_tag_length(self.buffer, TOOL_CALLS)
            events += self.text(self.buffer[:len(self.buffer) - held])
            self.buffer = self.buffer[len(self.buffer) - held:]
            return False
        events += self.text(self.buffer[:pos])
        self.buffer = self.buffer[pos + len(TOOL_CALLS):]
        self.markup, self.mode, self.in_list = TOOL_CALLS, "between", False
        return True

    def between(self, events: list[Event], final: bool) -> bool:
        stripped = self.buffer.lstrip(LAYOUT)
        self.markup += self.buffer[:len(self.buffer) - len(stripped)]
        self.buffer = stripped
        if not stripped:
            return False
        just_marked = self.markup.strip() == TOOL_CALLS
        if stripped[0] == "[" and just_marked:
            self.in_list = True
            self.markup += "["
            self.buffer = stripped[1:]
        elif stripped[0] == "]" and self.in_list:
            self.in_list, self.markup, self.mode = False, "", "text"
            self.buffer = stripped[1:]
        elif stripped[0] == "{":
            self.start_object(None, named=False)
        elif just_marked:
            self.mode = "named"
        else:  # the calls are over: what follows is content
            self.to_text(events)
        return True

    def named(self, events: list[Event], final: bool) -> bool:
        """`name[ARGS]` or `name[CALL_ID]id[ARGS]`, read whole before the call starts."""
        args = self.buffer.find(ARGS)
        if args < 0:
            if not final and could_be_named_head(self.buffer):
                return False
            self.to_text(events)
            return True
        name, _, call_id = self.buffer[:args].partition(CALL_ID)
        if NAME.fullmatch(name) is None or (call_id and NAME.fullmatch(call_id) is None):
            self.to_text(events)
            return True
        self.markup += self.buffer[:args + len(ARGS)]
        self.buffer = self.buffer[args + len(ARGS):].lstrip()
        call = self.start_object(call_id or None, named=True)
        call.payload = f'{{"name": {json.dumps(name)}, "arguments": '
        return True

    def to_text(self, events: list[Event]) -> None:
        events += self.text(self.markup)
        self.markup, self.mode, self.in_list = "", "text", False

    def start_object(self, call_id: str | None, named: bool):
        self.reader = JsonObjectReader()
        self.mode, self.named_call = "object", named
        return self.start_call(call_id)

    def in_object(self, events: list[Event], final: bool) -> bool:
        call = self.calls[-1]
        end = self.reader.read(self.buffer)
        if end is None:
            events += call.add(self.buffer)
            self.buffer = ""
            return False
        events += call.add(self.buffer[:end] + ("}" if self.named_call else ""))
        self.buffer = self.buffer[end:]
        events += self.end_call(self.markup)
        self.markup = ""
        self.mode = "between" if self.in_list or not self.named_call else "text"
        return True


def could_be_named_head(text: str) -> bool:
    """`text` may still grow into `name[ARGS]` or `name[CALL_ID]id[ARGS]`."""
    match = NAME.match(text)
    rest = text[match.end():] if match else text
    if not match:
        return False
    if rest.startswith(CALL_ID):
        ident = NAME.match(rest, len(CALL_ID))
        rest = rest[ident.end():] if ident else rest[len(CALL_ID):]
        return not rest or ARGS.startswith(rest)
    return not rest or ARGS.startswith(rest) or CALL_ID.startswith(rest)


def nine_char_id(call_id: str | None) -> str | None:
    """Mistral's templates take only 9-character alphanumeric call ids; any other id maps to
    one derived from it, so a call and its result still share an id."""
    if call_id is None or (len(call_id) == 9 and all(c in ALPHANUMERIC for c in call_id)):
        return call_id
    digest = hashlib.sha256(call_id.encode()).digest()
    return "".join(ALPHANUMERIC[b % len(ALPHANUMERIC)] for b in digest[:9])
