"""Opt-in fault injection for reliability tests: a marked request makes an engine step raise.

Off unless `EngineConfig.fault_marker` is set. A request whose prompt text contains the marker
raises `InjectedFault` from every step that schedules it, as a request that trips a model or
kernel bug would; the engine isolates it, fails it alone and keeps serving the others.
"""
from __future__ import annotations

from typing import Any


class InjectedFault(RuntimeError):
    """Raised inside an engine step on purpose (EngineConfig.fault_marker)."""


class FaultInjector:
    def __init__(self, marker: str | None, tokenizer: Any) -> None:
        self.marker = marker or None
        self.tokenizer = tokenizer
        self.marked: set[str] = set()  # request ids that raise whenever scheduled

    def watch(self, request_id: str, prompt_token_ids: list[int]) -> None:
        if self.marker and self.marker in self.tokenizer.decode(prompt_token_ids):
            self.marked.add(request_id)

    def forget(self, request_id: str) -> None:
        self.marked.discard(request_id)

    def check(self, request_ids: list[str]) -> None:
        """Raise if a marked request is in the batch about to run."""
        if not self.marked:
            return
        hit = next((r for r in request_ids if r in self.marked), None)
        if hit is not None:
            raise InjectedFault(f"fault injected by request {hit!r} (fault_marker is set)")
