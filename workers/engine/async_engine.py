"""Async front of the engine: a background thread runs the step loop, callers await deltas.

Requests and aborts cross into the engine thread through a command queue. A step's outputs
go back with one `call_soon_threadsafe` per event loop, not one per request: the loop builds
the output objects and routes them to each caller's asyncio queue while the engine thread
runs the next step. The event loop never runs a model forward, so the HTTP side stays
responsive while the engine computes.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Sequence

from workers.engine.config import EngineConfig
from workers.engine.errors import EngineDeadError, QueueFullError
from workers.engine.llm_engine import LLMEngine
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams

log = logging.getLogger("pagoda.engine")
STATS_INTERVAL_S = 0.05


class _Stream:
    """Where one request's outputs land, owned by the caller's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, **engine_kwargs) -> None:
        self.engine = LLMEngine(config, **engine_kwargs)
        self.config = config
        self.tokenizer = self.engine.tokenizer
        self.max_choices: int | None = config.max_choices
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._loops: set[asyncio.AbstractEventLoop] = set()  # those callers wait on
        self._stopping = False
        self._dead: BaseException | None = None
        self._stats = self.engine.stats()
        self._stats_time = time.monotonic()
        self.step_count = 0
        self._thread = threading.Thread(target=self._loop, name="pagoda-engine", daemon=True)
        self._thread.start()

    # ---- caller side (event loop) ----
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncGenerator[RequestOutput, None]:
        if not self.is_alive():
            raise EngineDeadError(f"engine loop is dead: {self._dead!r}")
        self.engine.validate(prompt_token_ids, params)
        if self._stats["num_waiting"] >= self.config.max_waiting_requests:
            raise QueueFullError(f"{self._stats['num_waiting']} requests are waiting; "
                                 "try again shortly.")
        compiled = None
        if params.json_schema is not None or params.grammar is not None:
            # off the event loop and the engine thread; a bad schema is this caller's 400
            compiled = await asyncio.to_thread(self.engine.compile_grammar, params)
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        self._loops.add(stream.loop)
        self._send(("add", request_id, list(prompt_token_ids), params, compiled))
        finished = False
        error: BaseException | None = None  # drained behind outputs; raised after them
        try:
            while True:
                item = error or await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                # a consumer that fell behind gets every waiting delta as one
                while not item.finished and not stream.queue.empty():
                    later = stream.queue.get_nowait()
                    if isinstance(later, BaseException):
                        error = later
                        break
                    item = item.merge(later)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the consumer went away: free the KV blocks now
                self._send(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def stats(self) -> dict:
        return dict(self._stats)

    def is_alive(self) -> bool:
        return self._dead is None and self._thread.is_alive() and self.engine.workers_alive()

    async def shutdown(self, drain: bool = True, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while drain and self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stopping = True
        self._wakeup.set()
        await asyncio.to_thread(self._thread.join, max(0.0, deadline - time.monotonic()) + 1)

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # ---- engine thread ----
    def _loop(self) -> None:
        try:
            self.engine.runner.prepare_thread()
            while not self._stopping:
                self._apply_commands()
                if not self.engine.has_unfinished():
                    self._stats = self.engine.stats()
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
                    continue
                self._step()
            for stream in list(self._streams.values()):  # the caller resumes them elsewhere
                stream.put(EngineDeadError("the model replica stopped before this request ended"))
        except BaseException as e:  # a bug in the loop or a dead rank: fail everyone, report dead
            log.exception("engine loop died")
            self._dead = e
            for stream in list(self._streams.values()):
                stream.put(EngineDeadError(f"engine loop died: {e!r}"))
        finally:
            self.engine.close()

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            kind, request_id = command[0], command[1]
            if kind == "add":
                try:
                    self.engine.add_request(request_id, *command[2:])
                except Exception as e:  # noqa: BLE001 - the caller gets it, the loop lives on
                    self._deliver_error(request_id, e)
            elif kind == "abort":
                out = self.engine.abort(request_id)
                if out is not None:
                    self._deliver(out)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineDeadError:
            raise
        except Exception as e:
            # Scheduling or bookkeeping broke, not one request: fail them all, keep serving.
            log.exception("engine step failed; aborting every request")
            for seq in self.engine.abort_all():
                self._deliver_error(seq.request_id, e)
            return
        self.step_count += 1
        if outputs or self.engine.failed:
            self._publish(outputs, self.engine.failed)
        # a snapshot copies every cached block hash: fresh enough at 20 Hz, not every step
        if time.monotonic() - self._stats_time >= STATS_INTERVAL_S:
            self._stats = self.engine.stats()
            self._stats_time = time.monotonic()

    def _publish(self, outputs: Sequence[RequestOutput],
                 failed: list[tuple[str, Exception]]) -> None:
        """Hand a step's outputs and errors to every caller's loop, in step order."""
        for loop in list(self._loops):
            try:
                loop.call_soon_threadsafe(self._route, loop, outputs, failed)
            except RuntimeError:  # closed: nobody waits there any more
                self._loops.discard(loop)

    def _route(self, loop: asyncio.AbstractEventLoop, outputs: Sequence[RequestOutput],
               failed: list[tuple[str, Exception]]) -> None:
        """On `loop`: each output and error to its caller's queue."""
        streams = self._streams
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is not None and stream.loop is loop:
                stream.queue.put_nowait(out)
        for request_id, error in failed:
            stream = streams.get(request_id)
            if stream is not None and stream.loop is loop:
                stream.queue.put_nowait(error)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is not None:
            stream.put(out)

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(error)
