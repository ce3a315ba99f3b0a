"""The engine interface the API expects, served by the model-replica deployment.

`generate` streams from a replica through `handle.options(stream=True)`; when the caller stops
iterating (client disconnect, n>1 sibling failed) the Serve call is cancelled, which aborts the
request in that replica's engine. Ray and Serve failures become our typed engine errors, so
`app/errors.py` answers them like any engine error.

When the replica is lost mid-request (actor died, engine loop dead, replica stopping), the
request resumes on another replica from the tokens already received: the caller sees one
continuous stream. After `max_resumes` resumes the error goes to the caller.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve import context as serve_context
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from workers.engine.config import EngineConfig
from workers.engine.errors import EngineDeadError, EngineError, QueueFullError
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import PriorOutput, SamplingParams

logger = logging.getLogger("pagoda.router")
RESUME_BACKOFF_S = 0.5  # times the resume number: a second loss in a row may be Serve catching up


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


@dataclass
class Received:
    """What the caller has received of one request: where a resumed request starts from."""

    token_ids: list[int] = field(default_factory=list)
    num_chars: int = 0
    cached_tokens: int | None = None  # the first replica's prefix-cache hit, for usage

    def record(self, out: RequestOutput) -> RequestOutput:
        self.token_ids += out.token_ids
        self.num_chars += len(out.text)
        if self.cached_tokens is None:
            self.cached_tokens = out.cached_tokens
        elif out.cached_tokens != self.cached_tokens:
            out = dataclasses.replace(out, cached_tokens=self.cached_tokens)
        return out

    def params(self, params: SamplingParams) -> SamplingParams:
        """The request's params, continuing after what was received."""
        if not self.token_ids:
            return params
        # prompt logprobs came with the first output
        return dataclasses.replace(params, prompt_logprobs=None, prior_output=PriorOutput(
            list(self.token_ids), self.num_chars))


class ReplicaClient:
    """The `app.engine_client.EngineClient` of model replicas, through a DeploymentHandle."""

    def __init__(self, handle: Any, config: EngineConfig, tokenizer: Any,
                 max_choices: int | None, max_resumes: int) -> None:
        self.handle = handle.options(stream=True, method_name="generate")
        self.config = config
        self.tokenizer = tokenizer
        self.max_choices = max_choices
        self.max_resumes = max_resumes
        self.num_resumes = 0
        self.in_flight: dict[str, Any] = {}  # request id -> DeploymentResponseGenerator

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncGenerator[RequestOutput, None]:
        received = Received()
        lost: list[str] = []  # replicas that failed this request, avoided when routing it
        for resumes in range(self.max_resumes + 1):
            try:
                stream = self.stream(prompt_token_ids, received.params(params), request_id, lost)
                async with contextlib.aclosing(stream):
                    async for out in stream:
                        yield received.record(out)
                return
            except (EngineDeadError, QueueFullError) as e:
                # a full queue fails a new request (503) but waits out a resumed one
                if resumes == self.max_resumes or \
                        (isinstance(e, QueueFullError) and not received.token_ids):
                    raise
                if isinstance(e, EngineDeadError) and e.replica_id:
                    lost.append(e.replica_id)
                self.num_resumes += 1
                logger.warning("request %s lost its replica after %d tokens (%s); resuming",
                               request_id, len(received.token_ids), type(e.__cause__ or e).__name__)
                await asyncio.sleep(RESUME_BACKOFF_S * resumes)

    async def stream(self, prompt_token_ids: list[int], params: SamplingParams,
                     request_id: str, avoid: list[str]) -> AsyncGenerator[RequestOutput, None]:
        """One attempt on one replica, its failures as typed engine errors."""
        response = None
        final: RequestOutput | None = None
        try:
            routing = {"avoid_replicas": list(avoid)} if avoid else {}
            response = self.call(prompt_token_ids, params, request_id, time.time(), **routing)
            self.in_flight[request_id] = response
            async for out in response:
                final = out if out.finished else None
                yield out
            if final is None:
                raise EngineDeadError("the model replica ended the stream unfinished")
        except EngineDeadError:
            raise
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

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """`handle.remote(*args)` under a request context with its own internal request id.

        Serve gives every call made while serving one HTTP request the proxy's internal id,
        and its request router matches assignments by that id: the choices of an n>1 request,
        routed at the same time, would leave all but one waiting forever.
        """
        context = serve_context._get_serve_request_context()
        # Serve declares this private ContextVar without its type, so mypy infers ContextVar[None]
        token = serve_context._serve_request_context.set(
            dataclasses.replace(context, _internal_request_id=uuid.uuid4().hex))  # type: ignore[arg-type]
        try:
            return self.handle.remote(*args, **kwargs)
        finally:
            serve_context._serve_request_context.reset(token)

    async def abort(self, request_id: str) -> None:
        response = self.in_flight.pop(request_id, None)
        if response is not None:
            with contextlib.suppress(Exception):
                response.cancel()

    def stats(self) -> dict:
        # engine numbers live on the replicas, exported there through ray.util.metrics
        return {"num_in_flight": len(self.in_flight), "num_resumes": self.num_resumes}

    def is_alive(self) -> bool:
        # replica health is Serve's job: dead replicas are replaced and never routed to
        return True
