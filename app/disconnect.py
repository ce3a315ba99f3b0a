"""Runs a coroutine unless the HTTP client goes away first."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from fastapi import Request

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone if the client left first (then `work` is cancelled).

    Both tasks are awaited to the end and their outcomes read, whatever happens, so no task
    is left running or holding an exception nobody retrieves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.wait({task, watcher})
        for done in (task, watcher):
            if not done.cancelled():
                done.exception()  # read here; the task's is raised again below
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def start_unless_disconnected(request: Request, fanout) -> bool:
    """Wait for a Fanout's first outputs; False (fanout closed, request marked aborted) if the
    client left first, since those outputs may wait behind a queue."""
    try:
        await unless_disconnected(request, fanout.start())
    except ClientGone:
        await fanout.close()
        request.state.finish_reason = "abort"
        return False
    return True


async def collect_unless_disconnected(request: Request, fanout, work: Awaitable[None],
                                      on_end: Callable[[], None]) -> bool:
    """Run `work`, which reads a started Fanout to its end, unless the client leaves first;
    the fanout is closed and `on_end` runs either way. False (request marked aborted) if the
    client left."""
    try:
        await unless_disconnected(request, work)
    except ClientGone:
        request.state.finish_reason = "abort"
        return False
    finally:
        with anyio.CancelScope(shield=True):
            await fanout.close()
        on_end()
    return True
