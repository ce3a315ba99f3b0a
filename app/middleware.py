"""ASGI middleware around every request: x-request-id, API key, body limits, access log,
request metrics.

Pure ASGI (no BaseHTTPMiddleware) so streaming and client disconnects pass through untouched.
A client that leaves before its response is complete is recorded as 499 with
finish_reason="abort", whatever status was already sent; only server faults are 5xx.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Sequence

from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import APIError, error_response, unauthorized
from app.metrics import Metrics
from app.settings import Settings

logger = logging.getLogger("pagoda.api")

OPEN_PATHS = {"/health", "/metrics", "/openapi.json"}


def endpoint_of(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The metrics label of a request: the name of the route it goes to."""
    for route in routes:
        if isinstance(route, Route) and route.matches(scope)[0] != Match.NONE:
            return route.name
    return "other"


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def authorized(scope: Scope, api_key: str) -> bool:
    value = header(scope, b"authorization") or ""
    scheme, _, token = value.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              api_key.encode())


CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection first


def unsupported_body(scope: Scope, max_bytes: int) -> APIError | None:
    """A POST body we refuse before reading it: not JSON (415), or declared too large (413)."""
    if scope.get("method") != "POST":
        return None
    content_type = header(scope, b"content-type")
    media_type = (content_type or "").split(";")[0].strip().lower()
    if content_type is not None and media_type != "application/json" \
            and not media_type.endswith("+json"):
        return APIError(415, f"Content-Type must be application/json, got {media_type!r}.",
                        code="unsupported_media_type")
    length = header(scope, b"content-length") or ""
    if length.isascii() and length.isdigit() and int(length) > max_bytes:
        return too_large(max_bytes)
    return None


def too_large(max_bytes: int) -> APIError:
    return APIError(413, f"The request body is larger than the limit of {max_bytes} bytes.",
                    code="request_too_large")


class RequestContext:
    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics,
                 routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = header(scope, b"x-request-id") or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["arrival"] = time.monotonic()
        state["request_id"] = request_id
        path = scope.get("path", "")
        endpoint = endpoint_of(self.routes, scope)
        status = 500
        complete = False  # the response's last byte was sent
        client_left = False
        body_bytes = 0
        max_bytes = self.settings.max_request_bytes

        async def send_with_id(message: Message) -> None:
            nonlocal status, complete, client_left
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            try:
                await send(message)
            except OSError:  # the connection is gone
                client_left = True
                raise

        async def receive_watched() -> Message:
            nonlocal client_left, body_bytes
            if client_left:
                return {"type": "http.disconnect"}
            try:
                message = await receive()
            except Exception:  # noqa: BLE001 - Serve's receive channel fails once the proxy
                message = {"type": "http.disconnect"}  # let go of the request: the client left
            if message["type"] == "http.disconnect":
                client_left = True
            elif message["type"] == "http.request":
                body_bytes += len(message.get("body", b""))
                if body_bytes > max_bytes:  # a body without (or with a false) Content-Length
                    raise too_large(max_bytes)
            return message

        self.metrics.in_flight.labels(self.metrics.model, endpoint).inc()
        try:
            key = self.settings.api_key
            refused = unsupported_body(scope, max_bytes)
            if key and path not in OPEN_PATHS and not authorized(scope, key):
                await error_response(unauthorized())(scope, receive, send_with_id)
            elif refused is not None:
                await error_response(refused)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive_watched, send_with_id)
        except asyncio.CancelledError:  # Serve cancels the request of a client that left
            client_left = True
            raise
        except (ClientDisconnect, OSError):
            if not client_left:
                raise
            # nobody is left to answer: the access log line below is all there is to say
        finally:
            self.metrics.in_flight.labels(self.metrics.model, endpoint).dec()
            finish_reason = state.get("finish_reason") or "none"
            if (client_left and not complete) or status == CLIENT_CLOSED:
                status, finish_reason = CLIENT_CLOSED, "abort"
            self.metrics.record_request(endpoint, status, finish_reason)
            elapsed_ms = (time.monotonic() - state["arrival"]) * 1000
            logger.info("%s %s %s %d %.1fms finish=%s", request_id, scope.get("method"), path,
                        status, elapsed_ms, finish_reason)
