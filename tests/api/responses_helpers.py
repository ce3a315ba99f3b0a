"""Raw parsing of Responses API streams and the event grammar every stream must follow."""
from __future__ import annotations

import json

import httpx
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

EVENTS = TypeAdapter(ResponseStreamEvent)
TERMINAL = ("response.completed", "response.incomplete", "response.failed")
PART_EVENTS = {"message": "output_text", "reasoning": "reasoning_text"}


def parse_named_sse(body: str) -> list[dict]:
    """Events of a body of `event: <type>\\ndata: <json>\\n\\n` blocks, numbered from 0."""
    assert body.endswith("\n\n"), f"body does not end with a blank line: {body[-40:]!r}"
    events = []
    for block in body[:-2].split("\n\n"):
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        payload = json.loads(data_line[len("data: "):])
        assert payload["type"] == name_line[len("event: "):]
        EVENTS.validate_python(payload)
        events.append(payload)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def post_response_stream(http: httpx.Client, body: dict) -> list[dict]:
    response = http.post("/v1/responses", json={**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return parse_named_sse(response.text)


def check_response_stream(events: list[dict]) -> dict:
    """Asserts OpenAI's event order; returns the final response, whose output must be exactly
    the items the stream built."""
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"], types[:2]
    assert types[-1] in TERMINAL and not set(types[:-1]) & set(TERMINAL), types
    response_id = events[0]["response"]["id"]
    assert events[0]["response"]["status"] == "in_progress"
    assert events[0]["response"]["output"] == []
    items = []
    rest = events[2:-1]
    while rest:
        added, rest = rest[0], rest[1:]
        assert added["type"] == "response.output_item.added", added
        assert added["output_index"] == len(items)
        item = added["item"]
        assert item["status"] == "in_progress"
        where = {"item_id": item["id"], "output_index": len(items)}
        if item["type"] == "function_call":
            assert item["arguments"] == ""
            deltas, rest = take(rest, "response.function_call_arguments.delta", where)
            arguments = "".join(d["delta"] for d in deltas)
            done, rest = rest[0], rest[1:]
            assert done == {"type": "response.function_call_arguments.done", **where,
                            "arguments": arguments, "sequence_number": done["sequence_number"]}
        else:
            kind = PART_EVENTS[item["type"]]
            assert item["content"] == []
            part_added, rest = rest[0], rest[1:]
            assert part_added["type"] == "response.content_part.added"
            assert part_added["part"]["type"] == kind and part_added["part"]["text"] == ""
            deltas, rest = take(rest, f"response.{kind}.delta", where)
            text = "".join(d["delta"] for d in deltas)
            done, part_done, rest = rest[0], rest[1], rest[2:]
            assert done["type"] == f"response.{kind}.done" and done["text"] == text
            assert part_done["type"] == "response.content_part.done"
            assert part_done["part"] == {**part_added["part"], "text": text}
        item_done, rest = rest[0], rest[1:]
        assert item_done["type"] == "response.output_item.done", item_done
        assert item_done["output_index"] == len(items) and item_done["item"]["id"] == item["id"]
        assert item_done["item"]["status"] in ("completed", "incomplete")
        items.append(item_done["item"])
    final = events[-1]["response"]
    assert final["id"] == response_id and final["output"] == items
    assert final["status"] == events[-1]["type"].removeprefix("response.")
    Response.model_validate(final)
    return final


def take(events: list[dict], kind: str, where: dict) -> tuple[list[dict], list[dict]]:
    """The leading run of `kind` events, each for the item at `where`."""
    count = 0
    while count < len(events) and events[count]["type"] == kind:
        assert {k: events[count][k] for k in where} == where
        count += 1
    return events[:count], events[count:]
