"""Replica metrics through `ray.util.metrics`, so they reach Prometheus and the Ray dashboard.

Ray exports them with a `ray_` prefix: `pagoda_replica_num_running` is scraped as
`ray_pagoda_replica_num_running`. deploy/grafana/pagoda.json charts them under those names.
"""
from __future__ import annotations

from ray.util import metrics

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TOKEN_LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64,
                           1.28, 2.56]
TAG_KEYS = ("model", "replica")


class ReplicaMetrics:
    def __init__(self, model: str, replica: str) -> None:
        tags = {"model": model, "replica": replica}

        def gauge(name: str, description: str) -> metrics.Gauge:
            return metrics.Gauge(name, description, tag_keys=TAG_KEYS).set_default_tags(tags)

        def counter(name: str, description: str, extra: tuple[str, ...] = ()) -> metrics.Counter:
            return metrics.Counter(name, description,
                                   tag_keys=TAG_KEYS + extra).set_default_tags(tags)

        def histogram(name: str, description: str, buckets: list[float]) -> metrics.Histogram:
            return metrics.Histogram(name, description, boundaries=buckets,
                                     tag_keys=TAG_KEYS).set_default_tags(tags)

        self.num_running = gauge("pagoda_replica_num_running", "Requests running in the engine.")
        self.num_waiting = gauge("pagoda_replica_num_waiting", "Requests waiting in the engine.")
        self.kv_usage = gauge("pagoda_replica_kv_usage", "Fraction of KV cache blocks in use.")
        self.prefix_cache_hit_rate = gauge("pagoda_replica_prefix_cache_hit_rate",
                                           "Prefix-cache hits over queries since start.")
        self.prefix_cache_queries = counter("pagoda_replica_prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("pagoda_replica_prefix_cache_hits",
                                         "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("pagoda_replica_preemptions",
                                   "Running requests preempted for lack of KV blocks.")
        self.requests = counter("pagoda_replica_requests",
                                "Finished requests by finish reason and status.",
                                ("finish_reason", "status"))
        self.prompt_tokens = counter("pagoda_replica_prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("pagoda_replica_generation_tokens",
                                         "Tokens generated.")
        self.queue_time = histogram("pagoda_replica_queue_time_seconds",
                                    "From ingress arrival to the replica starting the request.",
                                    LATENCY_BUCKETS_S)
        self.ttft = histogram("pagoda_replica_time_to_first_token_seconds",
                              "From the replica starting the request to its first token.",
                              LATENCY_BUCKETS_S)
        self.itl = histogram("pagoda_replica_inter_token_latency_seconds",
                             "Time between consecutive tokens of a request.",
                             TOKEN_LATENCY_BUCKETS_S)
        self.e2e = histogram("pagoda_replica_e2e_latency_seconds",
                             "From the replica starting the request to its last token.",
                             LATENCY_BUCKETS_S)
        self.last_stats: dict = {}

    def record_stats(self, stats: dict) -> None:
        """Sets gauges from `engine.stats()` and adds counter deltas since the last call."""
        self.num_running.set(stats.get("num_running", 0))
        self.num_waiting.set(stats.get("num_waiting", 0))
        self.kv_usage.set(stats.get("kv_usage", 0.0))
        queries = stats.get("prefix_cache_queries", 0)
        hits = stats.get("prefix_cache_hits", 0)
        self.prefix_cache_hit_rate.set(hits / queries if queries else 0.0)
        for key, counter in (("prefix_cache_queries", self.prefix_cache_queries),
                             ("prefix_cache_hits", self.prefix_cache_hits),
                             ("num_preemptions", self.preemptions)):
            delta = stats.get(key, 0) - self.last_stats.get(key, 0)
            if delta > 0:
                counter.inc(delta)
        self.last_stats = stats

    def record_finish(self, finish_reason: str | None, status: str, prompt_tokens: int,
                      completion_tokens: int) -> None:
        self.requests.inc(1, tags={"finish_reason": finish_reason or "none", "status": status})
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            self.generation_tokens.inc(completion_tokens)
