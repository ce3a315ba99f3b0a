"""Helpers shared by the Serve end-to-end tests."""
from __future__ import annotations

from collections.abc import Iterator


def skip_to_first_content(lines: Iterator[str]) -> None:
    """Consume SSE lines up to the first chunk that carries content: generation has begun."""
    for line in lines:
        if line.startswith("data: {") and '"content"' in line:
            return
    raise AssertionError("the stream ended before any content")
