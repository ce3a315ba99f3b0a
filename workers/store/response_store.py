"""Stored Responses API responses, least recently used first out, bounded in count and bytes.

Every ingress replica shares one named, detached actor holding a ResponseRecords, so a
`previous_response_id` resolves whichever replica answers; the in-process API holds its own.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

STORE_ACTOR = "pagoda-response-store"
STORE_NAMESPACE = "pagoda"


class ResponseRecords:
    """Response id -> its record as ASCII JSON text (so characters are bytes)."""

    def __init__(self, max_records: int, max_bytes: int) -> None:
        if max_records < 1 or max_bytes < 1:
            raise ValueError("a response store needs room for at least one record")
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.records: OrderedDict[str, str] = OrderedDict()
        self.size = 0

    def put(self, response_id: str, record: str) -> None:
        self.delete(response_id)
        if len(record) > self.max_bytes:
            return  # larger than the whole store: kept nowhere
        self.records[response_id] = record
        self.size += len(record)
        while len(self.records) > self.max_records or self.size > self.max_bytes:
            _, evicted = self.records.popitem(last=False)
            self.size -= len(evicted)

    def get(self, response_id: str) -> str | None:
        record = self.records.get(response_id)
        if record is not None:
            self.records.move_to_end(response_id)
        return record

    def delete(self, response_id: str) -> bool:
        record = self.records.pop(response_id, None)
        if record is None:
            return False
        self.size -= len(record)
        return True

    def __len__(self) -> int:
        return len(self.records)


def store_actor(max_records: int, max_bytes: int) -> Any:
    """The cluster's store actor, created by whichever ingress replica asks first."""
    import ray

    actor = ray.remote(ResponseRecords).options(
        name=STORE_ACTOR, namespace=STORE_NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=-1)
    return actor.remote(max_records, max_bytes)


class ActorStore:
    """An ingress replica's side of the shared store (app.responses.store.ResponseStore)."""

    def __init__(self, max_records: int, max_bytes: int) -> None:
        self.actor = store_actor(max_records, max_bytes)

    async def put(self, response_id: str, record: dict) -> None:
        await self.actor.put.remote(response_id, json.dumps(record))

    async def get(self, response_id: str) -> dict | None:
        record = await self.actor.get.remote(response_id)
        return None if record is None else json.loads(record)

    async def delete(self, response_id: str) -> bool:
        return await self.actor.delete.remote(response_id)
