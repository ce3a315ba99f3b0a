"""Ingress settings; every environment variable of the API is read here, prefixed PAGODA_
(PAGODA_API_KEY, PAGODA_MAX_N, ...). Values given to the constructor win over the environment."""
from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAGODA_", env_ignore_empty=True, frozen=True,
                                      extra="ignore")

    api_key: str | None = None  # None: no authentication
    served_model_name: str | None = None  # None: the engine config's served_model_name
    # parser names of app/parsers/registry.py; "auto" picks them from the model folder
    tool_parser: str = "auto"
    reasoning_parser: str = "auto"
    max_n: int = Field(16, ge=1)
    log_prompts: bool = False  # prompt text in logs is opt-in
    retry_after_s: int = Field(1, ge=0)  # Retry-After sent with 503 when the queue is full
    max_request_bytes: int = Field(4 * 2**20, ge=1)  # larger bodies get 413 (TGI allows 2 MB)
    max_choices: int | None = None  # engine calls at once per request; None: engine's queue
    response_store_records: int = Field(1000, ge=1)  # stored Responses, LRU beyond it
    response_store_mb: int = Field(256, ge=1)  # and their total size
