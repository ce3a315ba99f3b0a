"""Where a steady decode step's device time goes: the kernels of one batch size, by share.

    python bench/gpu_profile.py --model /tmp/llama-8b --batch 64 --context 512

Builds the engine, brings `batch` requests of `context` random prompt tokens to steady decode,
then times `steps` decode steps with CUDA graphs (as the engine runs them) and without (the
graph's saving), and profiles the eager steps' kernels (torch.profiler): the top kernels by
device time and the launches per step. On a CPU the same runs time host ops instead.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from workers.engine.config import EngineConfig
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams


def steady_engine(args, cuda_graphs: bool) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                    max_num_seqs=args.batch, max_model_len=args.context + 1024,
                                    max_num_batched_tokens=max(4096, args.context),
                                    cuda_graphs=cuda_graphs, quantization=args.quantization))
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(str(i), [rng.randrange(engine.vocab_size)
                                    for _ in range(args.context)], params)
    while any(s.num_computed_tokens < len(s.prompt_token_ids) for s in engine.seqs.values()):
        engine.step()
    for _ in range(3):  # warm: every kernel of the decode batch compiled, graphs replayed once
        engine.step()
    return engine


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_ms(engine: LLMEngine, steps: int, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    result = {"batch": args.batch, "context": args.context, "model": args.model,
              "quantization": args.quantization or "none"}
    if cuda:
        engine = steady_engine(args, cuda_graphs=True)
        result["graph_step_ms"] = step_ms(engine, args.steps, args.device)
        engine.close()
        del engine
        torch.cuda.empty_cache()  # the next engine sizes its KV cache from free memory
    engine = steady_engine(args, cuda_graphs=False)
    result["eager_step_ms"] = step_ms(engine, args.steps, args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            engine.step()
        sync(args.device)
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    if cuda:  # kernels only: the device's own time
        kernels = [e for e in events if getattr(e, key, 0) > 0
                   and "CUDA" in str(getattr(e, "device_type", ""))]
        events = kernels or [e for e in events if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events) or 1
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)
    result["kernels"] = [{"name": e.key[:90], "calls_per_step": e.count / args.steps,
                          "us_per_step": getattr(e, key) / args.steps,
                          "share": getattr(e, key) / total} for e in rows[:args.top]]
    result["launches_per_step"] = sum(e.count for e in events) / args.steps if cuda else None
    result["profiled_us_per_step"] = total / args.steps
    print(f"decode step, batch {args.batch} x context {args.context}, {args.device}: "
          + (f"{result['graph_step_ms']:.3f} ms with CUDA graphs, " if cuda else "")
          + f"{result['eager_step_ms']:.3f} ms eager"
          + (f", {result['launches_per_step']:.0f} kernel launches per step" if cuda else ""))
    print("| op | calls/step | us/step | share |\n|---|---|---|---|")
    for k in result["kernels"]:
        print(f"| {k['name']} | {k['calls_per_step']:.1f} | {k['us_per_step']:.1f} | "
              f"{k['share']:.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
