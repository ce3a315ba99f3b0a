"""Engine throughput vs HF transformers `generate`, on the same requests and machine, and
against the roofline (bench/roofline.py) measured in the same run.

64 requests with mixed prompt lengths, 128 output tokens each (EOS ignored so every system
does the same work). Ours runs in each dtype asked for. HF runs sequentially (on a subset, then
per-token rates compare) in each of those dtypes and, on a CPU, in float32 (what
`from_pretrained` gives a user there); and as a static left-padded batch of 32 in each of those
dtypes. With `--tp N --pp M` it instead measures a replica split over N x M ranks against one
rank (bench/parallel.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.results import markdown_table, update_section
from bench.roofline import (
    COLUMNS_NOTE,
    StepRecorder,
    copy_bandwidth,
    matmul_peak,
    roofline_seconds,
)
from workers.engine.config import EngineConfig
from workers.engine.dtype import choose_dtype
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams

TEXT = ("The history of paged memory goes back to the Atlas computer, where pages of core were "
        "backed by a drum and mapped on demand. Modern inference servers borrow the same idea "
        "for the key-value cache of a transformer: fixed blocks, a table per sequence, and "
        "sharing of common prefixes between requests. ")


def make_prompts(tokenizer, num: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    corpus = tokenizer.encode(TEXT * 40)
    prompts = []
    for _ in range(num):
        length = rng.choice([16, 32, 64, 128, 256, 512])
        start = rng.randrange(0, len(corpus) - length)
        prompts.append(corpus[start:start + length])
    return prompts


def bench_ours(model: str, prompts, max_tokens: int, device: str, dtype: str,
               quantization: str | None = None, async_scheduling: bool | None = None,
               temperature: float = 0.0, top_p: float = 1.0,
               kv_cache_dtype: str = "auto") -> dict:
    llm = LLM(EngineConfig(model=model, device=device, max_num_seqs=len(prompts), dtype=dtype,
                           max_num_batched_tokens=4096, max_model_len=2048,
                           quantization=quantization, async_scheduling=async_scheduling,
                           kv_cache_dtype=kv_cache_dtype))
    # warm-up: the same prompt lengths in random tokens (no prefix-cache hits later), so every
    # kernel variant the run needs is compiled before it is timed
    rng = random.Random(1)
    vocab = llm.engine.vocab_size
    llm.generate([[rng.randrange(vocab) for _ in p] for p in prompts],
                 SamplingParams(max_tokens=8, ignore_eos=True))
    engine = llm.engine
    runner = engine.runner
    fp8 = quantization == "fp8"
    peak, bandwidth = matmul_peak(runner.dtype, device, fp8), copy_bandwidth(device)
    recorder = StepRecorder()
    recorder.attach(runner)
    replays_before, piecewise_before = runner.graphs.replays, runner.piecewise.replays
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                            ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{i}", p, params)
    forward = other = 0.0
    tokens = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        tokens += len(engine.step())
        forward += engine.last_step_time
        other += engine.last_schedule_time
    elapsed = time.perf_counter() - start
    busy = recorder.device_seconds()
    linear_itemsize = 1 if fp8 and device != "cpu" else None  # CPU multiplies dequantized
    roofline = roofline_seconds(recorder.steps, runner.model_config, runner.dtype.itemsize,
                                peak, bandwidth, linear_itemsize, runner.kv_dtype.itemsize)
    decode_steps = sum(any(n == 1 and c > 0 for n, c, _ in rows) for rows in recorder.steps)
    result = {"tok_s": tokens / elapsed, "elapsed": elapsed, "tokens": tokens,
              "roofline_s": roofline, "peak": peak, "bandwidth": bandwidth,
              "backend": runner.backend.name, "quantization": quantization or "none",
              "kv_cache_dtype": kv_cache_dtype,
              "outside_forward": other / (forward + other),
              "device_idle": None if busy is None else 1 - busy / elapsed,
              "kv_bytes_per_token": engine.runner.kv_bytes_per_token,
              "num_kv_blocks": runner.num_blocks, "steps": len(recorder.steps),
              "decode_steps": decode_steps,
              "graph_steps": runner.graphs.replays - replays_before,
              "piecewise_steps": runner.piecewise.replays - piecewise_before,
              "preemptions": engine.scheduler.num_preemptions,
              "fp8_matmuls": [dataclasses.asdict(c) for c in runner.fp8_matmuls]}
    engine.close()
    del llm, engine, runner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next engine sizes its KV cache from free memory
    return result


def bench_hf(model: str, prompts, max_tokens: int, batch: int, device: str, dtype: str) -> dict:
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).to(device).eval()
    pad = hf.config.eos_token_id
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        group = prompts[i:i + batch]
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_tokens,
                              min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
        tokens += (out.shape[1] - width) * len(group)
    elapsed = time.perf_counter() - start
    return {"tok_s": tokens / elapsed, "elapsed": elapsed, "tokens": tokens}


def random_note(model: str) -> str:
    with open(os.path.join(model, "config.json")) as f:
        like = json.load(f).get("pagoda_random_like")
    return (f"Random weights with the layer shapes of {like} (`bench/random_model.py`); with EOS "
            "ignored, speed does not depend on weight values.\n") if like else ""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--sequential-requests", type=int, default=4,
                        help="HF sequential runs on this many of the requests")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated; default float32,bfloat16 on CPU, bfloat16 on GPU")
    parser.add_argument("--quantization", default="none",
                        help="comma-separated, each run in every dtype: none, fp8")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="fp8: E4M3 keys and values; auto: the model's dtype")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers runs")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--no-results", action="store_true",
                        help="leave bench/RESULTS.md alone")
    parser.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="auto",
                        help="overlapped scheduling; auto: the engine's default for the device")
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_parallel_size")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    return parser.parse_args()


def weights_and_kv(result: dict) -> str:
    """The quantization column: the weights', with an FP8 KV cache named after it."""
    kv = ", fp8 KV" if result.get("kv_cache_dtype") == "fp8" else ""
    return result["quantization"] + kv


def main() -> None:
    args = parse_args()
    if args.tp * args.pp > 1:
        from bench.parallel import bench_parallel
        bench_parallel(args.model, args.tp, args.pp, args.device)
        return
    dtypes = (args.dtypes or ("bfloat16" if args.device == "cuda" else "float32,bfloat16")
              ).split(",")
    variants = [(d, q) for q in args.quantization.split(",") for d in dtypes]
    user_dtype = "bfloat16" if args.device == "cuda" else "float32"
    from transformers import AutoTokenizer
    prompts = make_prompts(AutoTokenizer.from_pretrained(args.model), args.requests)
    overlap = {"auto": None, "on": True, "off": False}[args.async_scheduling]
    ours = {(d, q): bench_ours(args.model, prompts, args.max_tokens, args.device, d,
                               None if q == "none" else q, overlap, args.temperature,
                               args.top_p, args.kv_cache_dtype) for d, q in variants}
    sequential, static = {}, {}
    if not args.no_hf:
        sequential = {d: bench_hf(args.model, prompts[:args.sequential_requests],
                                  args.max_tokens, 1, args.device, d)
                      for d in dict.fromkeys([user_dtype, *dtypes])}
        static = {d: bench_hf(args.model, prompts[:32], args.max_tokens, 32, args.device, d)
                  for d in dtypes}
    rows = []
    for (d, _), r in ours.items():
        r["roofline_tok_s"] = r["tokens"] / r["roofline_s"]
        r["of_roofline"] = r["tok_s"] / r["roofline_tok_s"]
        rows.append([f"Pagoda engine ({r['backend']} attention)", d, weights_and_kv(r),
                     args.requests,
                     f"{r['tok_s']:.1f}", f"{r['roofline_tok_s']:.0f}",
                     f"{r['of_roofline']:.0%}", f"{r['outside_forward']:.1%}",
                     "" if r["device_idle"] is None else f"{r['device_idle']:.1%}",
                     r["preemptions"], f"{r['graph_steps']}/{r['decode_steps']}",
                     f"{r['tok_s'] / sequential[user_dtype]['tok_s']:.1f}x" if sequential else "",
                     f"{r['tok_s'] / sequential[d]['tok_s']:.1f}x" if sequential else "",
                     f"{r['tok_s'] / static[d]['tok_s']:.1f}x" if static else ""])
    for d, r in sequential.items():
        rows.append(["HF generate, sequential", d, "none", args.sequential_requests,
                     f"{r['tok_s']:.1f}"] + [""] * 9)
    for d, r in static.items():
        rows.append(["HF generate, static batch 32", d, "none", 32, f"{r['tok_s']:.1f}"]
                    + [""] * 9)
    table = markdown_table(["system", "dtype", "quantization (weights, KV)", "requests",
                            "output tok/s",
                            "roofline tok/s", "of roofline", "outside forward", "device idle",
                            "preemptions",
                            "decode steps in CUDA graphs", f"vs HF sequential ({user_dtype})",
                            "vs HF sequential (same dtype)", "vs HF static 32 (same dtype)"], rows)
    limits = "\n".join(
        f"- {d}{'' if q == 'none' else ' ' + q}: matmul peak {r['peak'] / 1e9:.0f} GFLOP/s, "
        f"copy bandwidth {r['bandwidth'] / 1e9:.1f} GB/s ({torch.get_num_threads()} threads; "
        f"measured in this run), KV cache {r['num_kv_blocks']} blocks"
        for (d, q), r in ours.items())
    first = next(iter(ours.values()))
    dtype, reason = choose_dtype("auto", torch.device(args.device))
    auto_dtype = f"{str(dtype).removeprefix('torch.')} ({reason})"
    sampling = f"temperature {args.temperature}, top-p {args.top_p}" if args.temperature \
        else "greedy"
    notes = (f"\n\n{args.requests} requests, prompts of 16-512 tokens, {args.max_tokens} output "
             f"tokens each (EOS ignored), {sampling}, model `{os.path.basename(args.model)}` on "
             f"{args.device}.\n{random_note(args.model)}\n"
             f"{COLUMNS_NOTE}\n"
             f"{limits}\n- `dtype: auto` here: {auto_dtype}\n"
             f"- KV cache: {first['kv_bytes_per_token']} bytes per token ({dtypes[0]}, "
             f"kv_cache_dtype {args.kv_cache_dtype})\n")
    print(table + notes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{d}/{q}": r for (d, q), r in ours.items()}, f, indent=1)
    if not args.no_results:
        sampled = f", {sampling}" if args.temperature else ""  # its own section
        update_section(f"Engine ({args.device}, {os.path.basename(os.path.normpath(args.model))}"
                       f"{sampled})", table + notes)


if __name__ == "__main__":
    main()
