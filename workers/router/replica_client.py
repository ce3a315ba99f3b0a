"""The engine interface the API expects, served by the model-replica deployment.

`generate` streams from a replica through `handle.options(stream=True)`; when the caller stops
iterating (client disconnect, n>1 sibling failed) the Serve call is cancelled, which aborts the
request in that replica's engine. Ray and Serve failures become our typed engine errors, so
`app/errors.py` answers them like any engine error.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve import context as serve_context
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from workers.engine.config import EngineConfig
from workers.engine.errors import EngineDeadError, EngineError, QueueFullError
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams


def engine_error_of(exc: BaseException) -> BaseException:
    """The typed error a Ray/Serve failure stands for; other exceptions pass through."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, EngineError):
        return exc.cause
    if isinstance(exc, BackPressureError):
        return QueueFullError("every model replica's queue is full; try again shortly.")
    if isinstance(exc, (RayActorError, DeploymentUnavailableError)):
        return EngineDeadError(f"the model replica serving this request failed: {exc}")
    if isinstance(exc, RayTaskError):  # raised by this request inside a live replica: a 500
        return exc.cause if isinstance(exc.cause, Exception) else RuntimeError(str(exc))
    return exc


class ReplicaClient:
    """The `app.engine_client.EngineClient` of model replicas, through a DeploymentHandle."""

    def __init__(self, handle: Any, config: EngineConfig, tokenizer: Any) -> None:
        self.handle = handle.options(stream=True, method_name="generate")
        self.config = config
        self.tokenizer = tokenizer
        self.in_flight: dict[str, Any] = {}  # request id -> DeploymentResponseGenerator

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        response = None
        final: RequestOutput | None = None
        try:
            response = self.call(prompt_token_ids, params, request_id, time.time())
            self.in_flight[request_id] = response
            async for out in response:
                final = out if out.finished else None
                yield out
        except Exception as e:
            response = None  # the call is over; cancel() would only re-raise its error
            error = engine_error_of(e)
            if error is e:
                raise
            raise error from e
        finally:
            self.in_flight.pop(request_id, None)
            if final is None and response is not None:  # stopped early: free the KV blocks now
                with contextlib.suppress(Exception):
                    response.cancel()

    def call(self, *args: Any) -> Any:
        """`handle.remote(*args)` under a request context with its own internal request id.

        Serve gives every call made while serving one HTTP request the proxy's internal id,
        and its request router matches assignments by that id: the choices of an n>1 request,
        routed at the same time, would leave all but one waiting forever.
        """
        context = serve_context._get_serve_request_context()
        token = serve_context._serve_request_context.set(
            dataclasses.replace(context, _internal_request_id=uuid.uuid4().hex))
        try:
            return self.handle.remote(*args)
        finally:
            serve_context._serve_request_context.reset(token)

    async def abort(self, request_id: str) -> None:
        response = self.in_flight.pop(request_id, None)
        if response is not None:
            with contextlib.suppress(Exception):
                response.cancel()

    def stats(self) -> dict:
        # engine numbers live on the replicas, exported there through ray.util.metrics
        return {"num_in_flight": len(self.in_flight)}

    def is_alive(self) -> bool:
        # replica health is Serve's job: dead replicas are replaced and never routed to
        return True
