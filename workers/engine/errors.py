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
    """Prompt plus max_tokens does not fit the model's context. `what` names the prompt as the
    client sent it (messages, prompt, input); `named` words the same error for another name."""

    def __init__(self, limit: int, prompt_tokens: int, max_tokens: int | None = None,
                 what: str = "prompt") -> None:
        self.limit, self.prompt_tokens, self.max_tokens = limit, prompt_tokens, max_tokens
        head = f"This model's maximum context length is {limit} tokens. However, "
        if max_tokens is None:
            super().__init__(f"{head}your {what} resulted in {prompt_tokens} tokens. Please "
                             f"reduce the length of the {what}.", what)
        else:
            super().__init__(f"{head}you requested {prompt_tokens + max_tokens} tokens "
                             f"({prompt_tokens} in the {what}, {max_tokens} in the completion)."
                             f" Please reduce the length of the {what} or completion.",
                             "max_tokens")

    def named(self, what: str) -> ContextLengthError:
        return ContextLengthError(self.limit, self.prompt_tokens, self.max_tokens, what)

    def __reduce__(self) -> tuple:  # crosses Ray: rebuilt from its numbers
        return ContextLengthError, (self.limit, self.prompt_tokens, self.max_tokens)


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
