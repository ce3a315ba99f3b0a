"""ASGI middleware around every request: x-request-id, API key, access log, request metrics.

Pure ASGI (no BaseHTTPMiddleware) so streaming and client disconnects pass through untouched.
"""
from __future__ import annotations

import hmac
import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_response, unauthorized
from app.metrics import Metrics
from app.settings import Settings

logger = logging.getLogger("pagoda.api")

OPEN_PATHS = {"/health", "/metrics", "/openapi.json"}
ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/responses": "responses",
    "/v1/models": "models",
    "/tokenize": "tokenize",
    "/detokenize": "detokenize",
    "/health": "health",
    "/metrics": "metrics",
}


def endpoint_of(path: str) -> str:
    """The metrics label of a path; a stored response's path counts as `responses`."""
    if path.startswith("/v1/responses/"):
        return "responses"
    return ENDPOINTS.get(path, "other")


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


class RequestContext:
    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = header(scope, b"x-request-id") or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["arrival"] = time.monotonic()
        state["request_id"] = request_id
        path = scope.get("path", "")
        endpoint = endpoint_of(path)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        self.metrics.in_flight.labels(self.metrics.model, endpoint).inc()
        try:
            key = self.settings.api_key
            if key and path not in OPEN_PATHS and not authorized(scope, key):
                await error_response(unauthorized())(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.labels(self.metrics.model, endpoint).dec()
            finish_reason = state.get("finish_reason") or "none"
            self.metrics.record_request(endpoint, status, finish_reason)
            elapsed_ms = (time.monotonic() - state["arrival"]) * 1000
            logger.info("%s %s %s %d %.1fms finish=%s", request_id, scope.get("method"), path,
                        status, elapsed_ms, finish_reason)
