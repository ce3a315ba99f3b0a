"""One engine stream per choice, run side by side and interleaved as outputs arrive.

`start` waits for every choice's first output, so errors the engine raises before generating
(bad request, context length, full queue) become HTTP errors instead of stream events. `close`
stops unfinished streams, which aborts their requests in the engine and frees their blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams

logger = logging.getLogger("pagoda.api")


@dataclass
class Job:
    index: int  # the choice index in the response
    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str


class Fanout:
    def __init__(self, client: Any, jobs: list[Job]) -> None:
        self.client = client
        self.jobs = jobs
        self.streams: list[Any] = []
        self.pumps: list[asyncio.Task] = []
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished: set[int] = set()
        self.closed = False

    async def start(self) -> None:
        self.streams = [self.client.generate(j.prompt_token_ids, j.params, j.request_id)
                        for j in self.jobs]
        firsts = await asyncio.gather(*(anext(s) for s in self.streams),
                                      return_exceptions=True)
        errors = [r for r in firsts if isinstance(r, BaseException)]
        if errors:
            await self.close()
            raise errors[0]
        for job, stream, first in zip(self.jobs, self.streams, firsts, strict=True):
            self.queue.put_nowait((job.index, first))
            self.pumps.append(asyncio.create_task(self.pump(job.index, stream)))

    async def pump(self, index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                self.queue.put_nowait((index, out))
        except Exception as e:  # noqa: BLE001 - the consumer turns it into an error event
            self.queue.put_nowait((index, e))
        self.queue.put_nowait((index, None))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) in arrival order until every choice finished."""
        pending = len(self.jobs)
        while pending:
            index, item = await self.queue.get()
            if item is None:
                pending -= 1
                continue
            if isinstance(item, Exception):
                raise item
            if item.finished:
                self.finished.add(index)
            yield index, item

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for pump in self.pumps:
            pump.cancel()
        await asyncio.gather(*self.pumps, return_exceptions=True)
        for job, stream in zip(self.jobs, self.streams, strict=True):
            if job.index in self.finished:
                continue
            with contextlib.suppress(Exception):
                await close_stream(stream)
            with contextlib.suppress(Exception):
                await self.client.abort(job.request_id)


async def close_stream(stream: Any) -> None:
    if hasattr(stream, "aclose"):
        await stream.aclose()
    elif hasattr(stream, "cancel"):
        stream.cancel()
