"""The one place that turns exceptions into OpenAI-shaped errors:
`{"error": {"message", "type", "param", "code"}}` with the right HTTP status."""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from workers.engine.errors import (
    ContextLengthError,
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
)

logger = logging.getLogger("pagoda.api")

INTERNAL_MESSAGE = "The server had an error while processing your request."


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(HTTPException):
    """An error with its HTTP status, ready to send. An HTTPException, so FastAPI passes it on
    as it is when it is raised while the body is read (a body over the size limit)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", param="model",
                    code="model_not_found")


def unauthorized() -> APIError:
    return APIError(401, "Incorrect API key provided.", code="invalid_api_key")


def describe_validation(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """A readable message and the first offending parameter from pydantic's error list."""
    parts: list[str] = []
    first_param: str | None = None
    for error in errors:
        if error.get("type") == "json_invalid":
            return f"The request body is not valid JSON: {error['ctx']['error']}.", None
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        first_param = first_param or param
        message = error.get("msg", "invalid value")
        parts.append(f"{param}: {message}" if param else message)
    return "Invalid request: " + "; ".join(parts), first_param


def to_api_error(exc: BaseException, retry_after_s: int = 1) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return bad_request(exc.message, exc.param or "messages", "context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return bad_request(exc.message, exc.param)
    if isinstance(exc, QueueFullError):
        return APIError(503, "The server is overloaded; retry later.", type="server_error",
                        code="queue_full", headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, EngineDeadError):
        return APIError(503, "The engine is unavailable.", type="server_error",
                        code="engine_dead")
    if isinstance(exc, json.JSONDecodeError):
        return bad_request(f"The request body is not valid JSON: {exc.msg} "
                           f"(line {exc.lineno} column {exc.colno}).")
    if isinstance(exc, HTTPException) and exc.status_code == 400 and exc.__cause__:
        return unreadable_body(exc.__cause__)  # FastAPI failed to parse the body
    if isinstance(exc, RequestValidationError | ValidationError):
        message, param = describe_validation(exc.errors())
        return bad_request(message, param)
    if isinstance(exc, ClientDisconnect):  # left while sending its body; nobody reads this
        return APIError(499, "The client closed the request.", code="client_closed_request")
    if isinstance(exc, HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind,
                        headers=dict(exc.headers or {}))
    logger.error("unhandled error", exc_info=(type(exc), exc, exc.__traceback__))
    return APIError(500, INTERNAL_MESSAGE, type="server_error")


def unreadable_body(cause: BaseException) -> APIError:
    if isinstance(cause, UnicodeDecodeError):
        return bad_request(f"The request body is not UTF-8 JSON: {cause.reason}.")
    if isinstance(cause, RecursionError):  # the parser recurses once per level of nesting
        return bad_request("The request body is nested too deeply.")
    if isinstance(cause, ValueError):  # an integer beyond Python's int-from-string digit limit
        return bad_request("The request body has a number with too many digits.")
    return bad_request("The request body is not valid JSON.")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc, retry_after_s))

    for kind in (APIError, InvalidRequestError, QueueFullError, EngineDeadError,
                 RequestValidationError, ValidationError, HTTPException, Exception):
        app.add_exception_handler(kind, handle)
