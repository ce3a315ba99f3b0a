"""Ingress metrics for Prometheus, prefixed `pagoda_`, in a registry owned by the app."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from workers.engine.outputs import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ENGINE_GAUGES = {
    "num_running": "Requests running in the engine.",
    "num_waiting": "Requests waiting in the engine.",
    "kv_usage": "Fraction of KV cache blocks in use.",
    "num_free_blocks": "Free KV cache blocks.",
    "prefix_cache_queries": "Prompt tokens looked up in the prefix cache.",
    "prefix_cache_hits": "Prompt tokens found in the prefix cache.",
    "num_preemptions": "Requests preempted so far.",
}


class EngineStatsCollector(Collector):
    """Engine gauges read at scrape time; an in-process engine has them, replicas export theirs."""

    def __init__(self, stats: Callable[[], dict], model: str) -> None:
        self.stats = stats
        self.model = model

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            stats = self.stats()
        except Exception:  # noqa: BLE001 - a scrape must not fail on a stats hiccup
            return
        for key, help_text in ENGINE_GAUGES.items():
            if isinstance(stats.get(key), int | float):
                family = GaugeMetricFamily(f"pagoda_engine_{key}", help_text, labels=["model"])
                family.add_metric([self.model], float(stats[key]))
                yield family


class Metrics:
    def __init__(self, model: str, stats: Callable[[], dict] | None = None) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        labels = ["model", "endpoint"]
        self.requests = Counter("pagoda_requests", "HTTP requests by outcome.",
                                labels + ["status", "finish_reason"], registry=self.registry)
        self.in_flight = Gauge("pagoda_requests_in_flight", "Requests being served.",
                               labels, registry=self.registry)
        self.ttft = Histogram("pagoda_time_to_first_token_seconds",
                              "Arrival to the first generated token.", labels,
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("pagoda_inter_token_latency_seconds",
                             "Time between generated tokens of a choice.", labels,
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("pagoda_e2e_request_latency_seconds",
                             "Arrival to the last byte of a generation request.", labels,
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("pagoda_prompt_tokens", "Prompt tokens processed.",
                                     labels, registry=self.registry)
        self.generation_tokens = Counter("pagoda_generation_tokens", "Tokens generated.",
                                         labels, registry=self.registry)
        if stats is not None:
            self.registry.register(EngineStatsCollector(stats, model))

    def record_request(self, endpoint: str, status: int, finish_reason: str) -> None:
        self.requests.labels(self.model, endpoint, str(status), finish_reason).inc()

    def timer(self, endpoint: str, arrival: float) -> GenerationTimer:
        return GenerationTimer(self, endpoint, arrival)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class GenerationTimer:
    """Latencies and token counts of one generation request (all its choices)."""

    def __init__(self, metrics: Metrics, endpoint: str, arrival: float) -> None:
        self.metrics = metrics
        self.labels = (metrics.model, endpoint)
        self.arrival = arrival
        self.first_seen = False
        self.last_token_at: dict[int, float] = {}

    def observe(self, index: int, out: RequestOutput) -> None:
        if not out.token_ids:
            return
        now = time.monotonic()
        if not self.first_seen:
            self.first_seen = True
            self.metrics.ttft.labels(*self.labels).observe(now - self.arrival)
        previous = self.last_token_at.get(index)
        if previous is not None:
            gap = (now - previous) / len(out.token_ids)
            for _ in out.token_ids:
                self.metrics.itl.labels(*self.labels).observe(gap)
        self.last_token_at[index] = now

    def finish(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.metrics.e2e.labels(*self.labels).observe(time.monotonic() - self.arrival)
        self.metrics.prompt_tokens.labels(*self.labels).inc(prompt_tokens)
        self.metrics.generation_tokens.labels(*self.labels).inc(completion_tokens)
