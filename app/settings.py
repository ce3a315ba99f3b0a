"""HTTP API settings. `ApiConfig` is the `api:` section of the Serve args; `Settings` adds the
PAGODA_-prefixed environment (PAGODA_API_KEY, PAGODA_MAX_N, ...), where values the args set win."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ApiConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # parsers of app/parsers/registry.py; "auto" picks them from the model folder
    tool_parser: Literal["auto", "none", "hermes", "llama3_json", "mistral"] = "auto"
    reasoning_parser: Literal["auto", "none", "think", "deepseek_r1", "qwen3"] = "auto"
    max_n: int = Field(16, ge=1)
    log_prompts: bool = False  # prompt text in logs is opt-in
    retry_after_s: int = Field(1, ge=0)  # Retry-After sent with 503 when the queue is full
    max_request_bytes: int = Field(4 * 2**20, ge=1)  # larger bodies get 413 (TGI allows 2 MB)
    response_store_records: int = Field(1000, ge=1)  # stored Responses, LRU beyond it
    response_store_mb: int = Field(256, ge=1)  # and their total size


class Settings(BaseSettings, ApiConfig):
    model_config = SettingsConfigDict(env_prefix="PAGODA_", env_ignore_empty=True, frozen=True,
                                      extra="ignore")

    api_key: str | None = None  # None: no authentication; never in the Serve args

    @classmethod
    def of(cls, api: ApiConfig) -> Settings:
        """The environment's settings under the ones `api` sets."""
        return cls(**api.model_dump(exclude_unset=True))
