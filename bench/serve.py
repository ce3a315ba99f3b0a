"""Serving benchmark: the OpenAI API on Ray Serve against the offline engine, and routing.

1. Offline: `LLMEngine` runs the ShareGPT-like request set at each concurrency (1, 8, 32, 64),
   admitting a request whenever one finishes.
2. Served: the same requests through `serve.run` of deploy/config.yaml's app with one replica
   and the same engine config, streamed by `openai.AsyncOpenAI` clients over loopback HTTP.
   served / offline output throughput is the cost of Ray Serve + HTTP + SSE. The same requests
   through a Serve handle, straight to a fresh replica, split it into the replica's share
   and the HTTP path's (proxy, ingress).
3. Routing: two replicas, multi-turn conversations with long per-conversation system prompts,
   once with prefix-affinity routing and once with power of two; prefix-cache hits and TTFT.

Everything runs on this machine in one process (Ray is started here); EOS is ignored so every
system generates exactly the requested tokens. Results go to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import math
import os
import sys
import time

import httpx
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.load_runs import RunStats, converse, run_offline, run_replica, run_served
from bench.results import markdown_table, update_section
from bench.workloads import conversations, sharegpt_like
from workers.engine.worker import free_port

APP = "pagoda"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "deploy", "config.yaml"))
    parser.add_argument("--concurrency", default="1,8,32,64",
                        help="comma-separated client concurrencies")
    parser.add_argument("--requests-per-client", type=float, default=2.0,
                        help="requests at each level = max(8, this x concurrency)")
    parser.add_argument("--max-tokens", type=int, default=64, help="longest output")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--turn-tokens", type=int, default=16)
    parser.add_argument("--think-s", type=float, default=1.0,
                        help="mean pause between a conversation's turns")
    parser.add_argument("--skip-routing", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md")
    return parser.parse_args()


def app_args(config_path: str, replicas: int, max_concurrency: int,
             routing_mode: str = "prefix_affinity") -> dict:
    """The config's app args with a fixed replica count and room for every client."""
    with open(config_path) as f:
        config = yaml.safe_load(f)
    args = copy.deepcopy(config["applications"][0]["args"])
    args["engine"]["max_num_seqs"] = max_concurrency
    if replicas > 1:  # two engines share the cores instead of oversubscribing them
        args["engine"]["num_threads"] = max(1, (os.cpu_count() or 2) // replicas)
    args["replicas"].update(min_replicas=replicas, max_replicas=replicas,
                            initial_replicas=replicas, target_ongoing_requests=max_concurrency,
                            max_ongoing_requests=max_concurrency + 8, max_queued_requests=-1)
    args["routing"] = {**args.get("routing", {}), "mode": routing_mode}
    return args


class Service:
    """Ray on this machine plus Serve's HTTP proxy on a free loopback port."""

    def __init__(self) -> None:
        import ray
        from ray import serve

        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.base_url = f"http://127.0.0.1:{self.port}"

    def deploy(self, args: dict, replicas: int) -> None:
        """Replaces the app with fresh replicas (empty prefix caches)."""
        from ray import serve

        from app.serve_app import build_app

        if APP in serve.status().applications:
            serve.delete(APP)
        serve.run(build_app(args), name=APP, route_prefix="/")
        deadline = time.monotonic() + 600
        while len(self.replica_loads()) != replicas or not self.answers():
            if time.monotonic() > deadline:
                raise TimeoutError("the app did not come up")
            time.sleep(0.5)

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/v1/models", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def replica_loads(self) -> dict:
        import ray

        from workers.tracker.load_tracker import find_tracker

        tracker = find_tracker()
        return {} if tracker is None else ray.get(tracker.snapshot.remote()).loads

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def fmt(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"  # nan: no samples


Levels = dict[int, tuple[RunStats, ...]]  # concurrency: (served, offline, via handle)


def sweep(args: argparse.Namespace, tokenizer) -> tuple[str, Levels]:
    from workers.engine.llm_engine import LLMEngine

    levels = [int(c) for c in args.concurrency.split(",")]
    requests = {c: sharegpt_like(tokenizer, max(8, round(args.requests_per_client * c)),
                                 args.max_tokens, seed=c) for c in levels}
    served_args = app_args(args.config, 1, max(levels))
    model = os.path.basename(os.path.normpath(served_args["model"]))
    from app.serve_args import PagodaArgs

    engine = LLMEngine(PagodaArgs.model_validate(served_args).engine)  # resolves `auto`
    run_offline(engine, sharegpt_like(tokenizer, 4, 8, seed=999), 4, "warmup")
    offline = {c: run_offline(engine, requests[c], c, f"c{c}") for c in levels}
    for c, stats in offline.items():
        print(f"offline c={c}: {stats.token_rate:.1f} tok/s", flush=True)
    del engine

    service = Service()
    results: Levels = {}
    try:
        service.deploy(served_args, replicas=1)
        serve_requests(service.base_url, model, sharegpt_like(tokenizer, 4, 8, seed=999), 4)
        for c in levels:
            served = serve_requests(service.base_url, model, requests[c], c)
            print(f"served c={c}: {served.token_rate:.1f} tok/s, {served.errors} errors",
                  flush=True)
            results[c] = (served, offline[c])
        service.deploy(served_args, replicas=1)  # a fresh replica: no prefix cached
        for c in levels:
            results[c] += (replica_requests(requests[c], c),)
            print(f"replica via handle c={c}: {results[c][2].token_rate:.1f} tok/s", flush=True)
        routing = "" if args.skip_routing else compare_routing(args, service, model)
    finally:
        service.stop()
    return routing, results


def openai_client(base_url: str):
    import openai

    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                              timeout=600)


def serve_requests(base_url: str, model: str, requests, concurrency: int) -> RunStats:
    async def run() -> RunStats:
        async with openai_client(base_url) as client:
            return await run_served(client, model, requests, concurrency)

    return asyncio.run(run())


def replica_requests(requests, concurrency: int) -> RunStats:
    from ray import serve

    handle = serve.get_deployment_handle("ModelReplica", app_name=APP).options(stream=True)
    return asyncio.run(run_replica(handle, requests, concurrency, f"c{concurrency}"))


def serve_conversations(base_url: str, model: str, chats, turn_tokens: int,
                        think_s: float) -> list:
    async def run() -> list:
        async with openai_client(base_url) as client:
            return await asyncio.gather(*(converse(client, model, chat, turn_tokens, think_s)
                                          for chat in chats))

    return asyncio.run(run())


def compare_routing(args: argparse.Namespace, service: Service, model: str) -> str:
    chats = conversations(args.conversations, args.turns, seed=7)
    rows = []
    for mode in ("prefix_affinity", "power_of_two"):
        service.deploy(app_args(args.config, 2, args.conversations, mode), replicas=2)
        before = service.replica_loads()
        start = time.perf_counter()
        per_chat = serve_conversations(service.base_url, model, chats, args.turn_tokens,
                                       args.think_s)
        stats = RunStats([s for samples in per_chat for s in samples],
                         time.perf_counter() - start)
        later = RunStats([s for samples in per_chat for s in samples[1:]], stats.elapsed)
        time.sleep(1)  # the replicas' next load report
        after = service.replica_loads()
        hits = sum(a.prefix_cache_hits - getattr(before.get(r), "prefix_cache_hits", 0)
                   for r, a in after.items())
        queries = sum(a.prefix_cache_queries - getattr(before.get(r), "prefix_cache_queries", 0)
                      for r, a in after.items())
        split = sorted(a.num_requests - getattr(before.get(r), "num_requests", 0)
                       for r, a in after.items())
        rows.append([mode.replace("_", " "), len(stats.samples), stats.errors,
                     f"{hits / max(queries, 1):.0%}", fmt(stats.ttft_ms(50)),
                     fmt(stats.ttft_ms(99)), fmt(later.ttft_ms(50)), fmt(later.ttft_ms(99)),
                     f"{stats.request_rate:.2f}", " / ".join(map(str, split))])
        print(rows[-1], flush=True)
    table = markdown_table(["routing", "requests", "errors", "prefix-cache hit rate",
                            "TTFT p50 (ms)", "TTFT p99 (ms)", "TTFT p50, turns 2+ (ms)",
                            "TTFT p99, turns 2+ (ms)", "req/s", "requests per replica"], rows)
    return (f"{table}\n\nTwo replicas (one CPU thread each), {args.conversations} "
            f"conversations run at once, {args.turns} turns each, every turn repeating a "
            f"~300-token system prompt of its own plus the history, a pause of 0-"
            f"{2 * args.think_s:g} s (mean {args.think_s:g} s) before each later turn; "
            f"{args.turn_tokens} output tokens per turn (EOS ignored), greedy. Hit rate: prompt "
            "tokens found in the replicas' prefix caches over prompt tokens looked up (engine "
            "counters, fresh replicas per policy; the first turns cannot hit, so the ceiling "
            "is about 75%). With `--think-s 0` the gap closes (one run: 61% affinity, 69% "
            "power of two): a closed loop sends a conversation's next turn the moment its "
            "replica frees a slot, so the shorter queue tends to be that replica's.\n")


def serving_section(args, results: Levels) -> str:
    rows = []
    for c, (served, offline, replica) in results.items():
        rows.append([c, len(served.samples), served.errors, f"{served.request_rate:.2f}",
                     f"{served.token_rate:.1f}", f"{offline.token_rate:.1f}",
                     f"{served.token_rate / offline.token_rate:.0%}",
                     f"{replica.token_rate / offline.token_rate:.0%}",
                     fmt(served.ttft_ms(50)), fmt(served.ttft_ms(99)),
                     fmt(offline.ttft_ms(50)), fmt(served.tpot_ms(50)),
                     fmt(offline.tpot_ms(50)), fmt(served.itl_ms(50)), fmt(served.itl_ms(99))])
    table = markdown_table(
        ["concurrency", "requests", "errors", "req/s", "output tok/s", "offline tok/s",
         "served / offline", "replica via handle / offline", "TTFT p50 (ms)",
         "TTFT p99 (ms)", "offline TTFT p50 (ms)", "TPOT p50 (ms)", "offline TPOT p50 (ms)",
         "ITL p50 (ms)", "ITL p99 (ms)"], rows)
    target = ""
    if 32 in results:
        served, offline, _ = results[32]
        target = (f"Served throughput at concurrency 32 is "
                  f"{served.token_rate / offline.token_rate:.0%} of offline (target: 85%). ")
    from app.serve_args import PagodaArgs

    threads = PagodaArgs.model_validate(app_args(args.config, 1, 1)).engine.num_threads or \
        os.cpu_count()
    return (f"{table}\n\n{target}One replica, the same engine config ({threads} engine "
            f"thread{'s' if threads != 1 else ''}, on {os.cpu_count()} cores) and requests "
            "offline and served. "
            f"Requests per level: max(8, {args.requests_per_client:g} x concurrency); prompts "
            f"8-768 tokens (log-normal, median 96), outputs 4-{args.max_tokens} tokens "
            "(log-normal), EOS ignored, greedy; closed loop (each client sends its next "
            "request when the last ends). Served: `openai.AsyncOpenAI` streaming "
            "/v1/completions with token-id prompts over loopback HTTP, Ray Serve proxy, "
            "ingress and replica on the same cores as the clients. Replica via handle: the "
            "same requests from this process straight to a fresh model replica through a "
            "Serve handle (no proxy, ingress or HTTP). TPOT: (e2e - TTFT) / (tokens - 1); "
            "ITL: gaps between streamed chunks.\n")


def main() -> None:
    args = parse_args()
    from transformers import AutoTokenizer

    os.chdir(ROOT)  # the config's model path is relative to the repository
    tokenizer = AutoTokenizer.from_pretrained(app_args(args.config, 1, 1)["model"])
    start = time.monotonic()
    routing, results = sweep(args, tokenizer)
    serving = serving_section(args, results)
    print(serving + "\n" + routing)
    print(f"bench/serve.py took {time.monotonic() - start:.0f}s")
    if not args.no_write:
        update_section("Serving", serving)
        if routing:
            update_section("Routing", routing)


if __name__ == "__main__":
    main()
