"""The engine interface the HTTP API talks to, and nothing else of the engine's process.

Two implementations: `workers.engine.async_engine.AsyncLLMEngine` in this process (tests, the
single-process mode) and `workers.router.replica_client.ReplicaClient`, model replicas behind
Ray Serve. Only token ids and SamplingParams cross it; tokenizing stays in the ingress.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from workers.engine.config import EngineConfig
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams


@runtime_checkable
class EngineClient(Protocol):
    tokenizer: Any
    config: EngineConfig  # the served model's name and limits
    max_choices: int | None  # engine calls it holds at once, running or queued; None: unbounded

    def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]:
        """Streams deltas; the last carries finish_reason. Closing it aborts the request."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict: ...

    def is_alive(self) -> bool: ...
