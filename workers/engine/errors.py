"""Typed engine errors; `app/errors.py` turns them into OpenAI-style HTTP responses."""
from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request the engine cannot serve as asked (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ContextLengthError(InvalidRequestError):
    """Prompt plus max_tokens does not fit the model's context."""


class QueueFullError(EngineError):
    """Too many requests waiting (HTTP 503 with Retry-After)."""


class EngineDeadError(EngineError):
    """The engine serving a request is gone (its loop stopped or its replica died); the
    ingress resumes the request on another replica. `replica_id` names the replica when known."""

    def __init__(self, message: str, replica_id: str | None = None) -> None:
        super().__init__(message)
        self.replica_id = replica_id


class WorkerGroupError(EngineDeadError):
    """A rank of a replica split over devices failed or died; the replica must be replaced."""
