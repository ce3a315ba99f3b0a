"""What the parsers make of output text, in order: content, reasoning, and tool calls as a
header then argument fragments. Endpoints turn these into their own wire format (chat chunks,
Responses events); nothing here knows of either."""
from __future__ import annotations

import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Reasoning:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    fragment: str


Event = Text | Reasoning | CallStart | CallArguments


@dataclass(frozen=True)
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON text: the concatenation of the call's fragments


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
