"""Where responses are kept for `previous_response_id` and GET/DELETE: a small async interface
over the records; this process's own here, the cluster's shared actor in
workers/store/response_store.py."""
from __future__ import annotations

import json
from typing import Protocol

from workers.store.response_store import ResponseRecords


class ResponseStore(Protocol):
    async def put(self, response_id: str, record: dict) -> None: ...

    async def get(self, response_id: str) -> dict | None: ...

    async def delete(self, response_id: str) -> bool: ...


class LocalStore:
    def __init__(self, max_records: int, max_bytes: int) -> None:
        self.records = ResponseRecords(max_records, max_bytes)

    async def put(self, response_id: str, record: dict) -> None:
        self.records.put(response_id, json.dumps(record))

    async def get(self, response_id: str) -> dict | None:
        record = self.records.get(response_id)
        return None if record is None else json.loads(record)

    async def delete(self, response_id: str) -> bool:
        return self.records.delete(response_id)
