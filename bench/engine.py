"""Engine throughput vs HF transformers `generate`, on the same requests and machine.

64 requests with mixed prompt lengths, 128 output tokens each (EOS ignored so every system
does the same work). HF runs sequentially (on a subset, then per-token rates compare) and as
a static left-padded batch of 32. With `--tp N --pp M` it instead measures a replica split
over N x M ranks against one rank (bench/parallel.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.results import markdown_table, update_section
from workers.engine.config import EngineConfig
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


def bench_ours(model: str, prompts, max_tokens: int, device: str) -> dict:
    llm = LLM(EngineConfig(model=model, device=device, max_num_seqs=len(prompts),
                           max_num_batched_tokens=4096, max_model_len=2048))
    llm.generate([prompts[0]], SamplingParams(max_tokens=4))  # warm-up
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
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
    return {"tok_s": tokens / elapsed, "elapsed": elapsed, "tokens": tokens,
            "outside_forward": other / (forward + other),
            "kv_bytes_per_token": engine.runner.kv_bytes_per_token,
            "preemptions": engine.scheduler.num_preemptions}


def bench_hf(model: str, prompts, max_tokens: int, batch: int, device: str) -> dict:
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32 if device == "cpu"
                                              else torch.bfloat16).to(device).eval()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--sequential-requests", type=int, default=4,
                        help="HF sequential runs on this many of the requests")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_parallel_size")
    args = parser.parse_args()
    if args.tp * args.pp > 1:
        from bench.parallel import bench_parallel
        bench_parallel(args.model, args.tp, args.pp, args.device)
        return
    from transformers import AutoTokenizer
    prompts = make_prompts(AutoTokenizer.from_pretrained(args.model), args.requests)
    ours = bench_ours(args.model, prompts, args.max_tokens, args.device)
    sequential = bench_hf(args.model, prompts[:args.sequential_requests], args.max_tokens, 1,
                          args.device)
    static = bench_hf(args.model, prompts[:32], args.max_tokens, 32, args.device)
    rows = [
        ["Pagoda engine (continuous batching)", args.requests, f"{ours['tok_s']:.1f}", "1.00"],
        ["HF generate, sequential", args.sequential_requests, f"{sequential['tok_s']:.1f}",
         f"{ours['tok_s'] / sequential['tok_s']:.1f}x"],
        ["HF generate, static batch 32", 32, f"{static['tok_s']:.1f}",
         f"{ours['tok_s'] / static['tok_s']:.1f}x"],
    ]
    table = markdown_table(["system", "requests", "output tok/s", "Pagoda speed-up"], rows)
    notes = (f"\n\n{args.requests} requests, prompts of 16-512 tokens, {args.max_tokens} output "
             f"tokens each (EOS ignored), greedy, model `{os.path.basename(args.model)}` on "
             f"{args.device}.\n{random_note(args.model)}\n"
             f"- KV cache: {ours['kv_bytes_per_token']} bytes per token\n"
             f"- share of engine step time outside the model forward (scheduling, batch "
             f"preparation, detokenization, stop checks): {ours['outside_forward']:.1%}\n"
             f"- preemptions: {ours['preemptions']}\n")
    print(table + notes)
    update_section(f"Engine ({args.device}, {os.path.basename(os.path.normpath(args.model))})",
                   table + notes)


if __name__ == "__main__":
    main()
