"""The model-replica Serve deployment: one AsyncLLMEngine per replica.

The ingress streams from `generate` through `handle.options(stream=True)`; Serve cancels the
call when the client goes away, which closes the engine stream and frees the request's KV
blocks. Load goes to the LoadTracker a few times a second for the request router.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator

from ray import serve

from workers.engine.config import EngineConfig
from workers.engine.errors import EngineDeadError
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams
from workers.replica.load_reporter import LoadReporter
from workers.replica.metrics import ReplicaMetrics


@serve.deployment(name="ModelReplica")  # options and router: ReplicaArgs, in app/serve_app.py
class ModelReplica:
    # Serve awaits an async constructor; mypy only knows synchronous ones
    async def __init__(self, config: EngineConfig, report_interval_s: float) -> None:  # type: ignore[misc]
        from workers.engine.async_engine import AsyncLLMEngine  # torch loads on replicas only
        from workers.replica.worker_actor import RayWorkers

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # split over devices, this actor is rank 0 and the other ranks are its worker actors
        self.engine = AsyncLLMEngine(
            config, start_workers=functools.partial(RayWorkers, replica_id=self.replica_id))
        runner = self.engine.engine.runner
        logging.getLogger("ray.serve").info(
            "engine: dtype %s (%s), attention backend %s, threads %s",
            str(runner.dtype).removeprefix("torch."), runner.dtype_reason, runner.backend.name,
            config.num_threads or "all cores")
        self.metrics = ReplicaMetrics(model=config.model_name, replica=self.replica_id)
        self.num_requests = 0
        self.reporter = LoadReporter(self.replica_id, config.block_size, self.read_stats,
                                     interval_s=report_interval_s)
        self.reporter.start()

    def read_stats(self) -> dict:
        stats = self.engine.stats()
        self.metrics.record_stats(stats)
        return {**stats, "num_requests": self.num_requests}

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str, arrival_time: float | None = None,
                       avoid_replicas: list[str] | None = None,
                       ) -> AsyncGenerator[RequestOutput, None]:
        """Streams the engine's deltas; the last one carries finish_reason.

        `avoid_replicas` is read by the request router (a resumed request shuns the replicas
        it was lost on)."""
        self.num_requests += 1
        start = time.time()
        if arrival_time is not None:
            self.metrics.queue_time.observe(max(0.0, start - arrival_time))
        last_token_at: float | None = None
        final: RequestOutput | None = None
        status = "error"
        cancelled = False
        try:
            stream = self.engine.generate(prompt_token_ids, params, request_id)
            async with contextlib.aclosing(stream):
                async for out in stream:
                    self.observe_tokens(out, start, last_token_at)
                    if out.token_ids:
                        last_token_at = time.time()
                    final = out
                    yield out
            status = "ok"
        except (GeneratorExit, asyncio.CancelledError):  # the caller went away
            status, cancelled = "cancelled", True
            raise
        except Exception as e:  # engine errors go back to the ingress as they are
            status = type(e).__name__
            if isinstance(e, EngineDeadError):  # the ingress resumes it elsewhere
                e.replica_id = self.replica_id
            raise
        finally:
            self.metrics.e2e.observe(time.time() - start)
            finish = final.finish_reason if final else None
            self.metrics.record_finish(finish or ("abort" if cancelled else None), status,
                                       final.prompt_tokens if final else 0,
                                       final.completion_tokens if final else 0)

    def observe_tokens(self, out: RequestOutput, start: float,
                       last_token_at: float | None) -> None:
        if not out.token_ids:
            return
        now = time.time()
        if last_token_at is None:
            self.metrics.ttft.observe(now - start)
            return
        gap = (now - last_token_at) / len(out.token_ids)
        for _ in out.token_ids:
            self.metrics.itl.observe(gap)

    def stats(self) -> dict:
        """Engine stats of this replica, for tests and debugging."""
        return {**self.engine.stats(), "replica_id": self.replica_id,
                "num_requests": self.num_requests}

    def check_health(self) -> None:
        if not self.engine.is_alive():  # also when a worker rank of this replica died
            raise EngineDeadError("the engine step loop or one of its worker ranks stopped")

    async def __del__(self) -> None:
        # Serve calls this once in-flight requests finished or graceful_shutdown_timeout_s
        # passed: streams still running end at once, and their callers resume them elsewhere
        await self.reporter.stop()
        await self.engine.shutdown(drain=False)
