"""Finds `name` and `arguments` in a possibly unfinished `{"name": ..., "arguments": ...}`, so
a tool call's arguments can stream out as the model writes them."""
from __future__ import annotations

import json
from dataclasses import dataclass

WHITESPACE = " \t\r\n"
ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class PayloadScan:
    name: str | None = None
    args_start: int | None = None  # index where the arguments value begins
    args_end: int | None = None  # index just after it, once it is complete
    complete: bool = False  # the closing brace of the object was seen


def skip_whitespace(text: str, i: int) -> int:
    while i < len(text) and text[i] in WHITESPACE:
        i += 1
    return i


def string_end(text: str, i: int) -> int | None:
    """Index after the JSON string starting at text[i] == '"', or None if unfinished."""
    i += 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i + 1
        i += 1
    return None


def value_end(text: str, i: int) -> int | None:
    """Index after the JSON value starting at text[i], or None if it is unfinished."""
    if text[i] == '"':
        return string_end(text, i)
    if text[i] in "{[":
        depth = 0
        while i < len(text):
            char = text[i]
            if char == '"':
                end = string_end(text, i)
                if end is None:
                    return None
                i = end
                continue
            if char in "{[":
                depth += 1
            elif char in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    while i < len(text) and text[i] not in ",}]" + WHITESPACE:
        i += 1
    return i if i < len(text) else None  # a number may still grow


def scan_payload(text: str) -> PayloadScan:
    scan = PayloadScan()
    i = skip_whitespace(text, 0)
    if i >= len(text) or text[i] != "{":
        return scan
    i += 1
    while True:
        i = skip_whitespace(text, i)
        if i >= len(text):
            return scan
        if text[i] == "}":
            scan.complete = True
            return scan
        if text[i] == ",":
            i += 1
            continue
        if text[i] != '"':
            return scan
        key_end = string_end(text, i)
        if key_end is None:
            return scan
        key = json.loads(text[i:key_end])
        i = skip_whitespace(text, key_end)
        if i >= len(text) or text[i] != ":":
            return scan
        i = skip_whitespace(text, i + 1)
        if i >= len(text):
            return scan
        end = value_end(text, i)
        if key in ARGUMENT_KEYS and scan.args_start is None:
            scan.args_start, scan.args_end = i, end
        if key == "name" and end is not None:
            name = json.loads(text[i:end])
            scan.name = name if isinstance(name, str) else None
        if end is None:
            return scan
        i = end
