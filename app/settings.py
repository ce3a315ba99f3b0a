"""Ingress settings; every environment variable of the API is read here, prefixed PAGODA_."""
from __future__ import annotations

import os
from dataclasses import dataclass


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    api_key: str | None = None  # None: no authentication
    served_model_name: str | None = None  # None: the engine config's served_model_name
    # parser names of app/parsers/registry.py; "auto" picks them from the model folder
    tool_parser: str = "auto"
    reasoning_parser: str = "auto"
    max_n: int = 16
    log_prompts: bool = False  # prompt text in logs is opt-in
    retry_after_s: int = 1  # Retry-After sent with 503 when the queue is full
    max_request_bytes: int = 4 * 2**20  # larger bodies get 413 (TGI allows 2 MB)
    max_choices: int | None = None  # engine calls at once per request; None: engine's queue
    response_store_records: int = 1000  # stored Responses API responses, LRU beyond it
    response_store_mb: int = 256  # and their total size

    def __post_init__(self) -> None:
        if self.max_n < 1:
            raise ValueError(f"max_n must be at least 1, got {self.max_n}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be non-negative, got {self.retry_after_s}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be positive, got {self.max_request_bytes}")
        if self.response_store_records < 1 or self.response_store_mb < 1:
            raise ValueError("response_store_records and response_store_mb must be positive")

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            api_key=os.environ.get("PAGODA_API_KEY") or None,
            served_model_name=os.environ.get("PAGODA_SERVED_MODEL_NAME") or None,
            tool_parser=os.environ.get("PAGODA_TOOL_PARSER") or "auto",
            reasoning_parser=os.environ.get("PAGODA_REASONING_PARSER") or "auto",
            max_n=int(os.environ.get("PAGODA_MAX_N", "16")),
            log_prompts=_env_flag("PAGODA_LOG_PROMPTS", False),
            retry_after_s=int(os.environ.get("PAGODA_RETRY_AFTER_S", "1")),
            max_request_bytes=int(os.environ.get("PAGODA_MAX_REQUEST_BYTES", str(4 * 2**20))),
            response_store_records=int(os.environ.get("PAGODA_RESPONSE_STORE_RECORDS", "1000")),
            response_store_mb=int(os.environ.get("PAGODA_RESPONSE_STORE_MB", "256")),
        )
