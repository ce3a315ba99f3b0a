"""Greedy tokens of the engine with the Triton attention backend against the torch reference
backend, in one dtype, on the real model: do they match, and does either collapse into one
repeated token? Prints a table; --json writes the tokens too."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.results import markdown_table
from workers.engine.config import EngineConfig
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams

PROMPTS = ["You are a helpful assistant. Question: What is the capital of France? Answer:",
           "Write a haiku about the sea.", "1, 2, 3, 4,"]


def greedy(model: str, backend: str, dtype: str, max_tokens: int) -> list[list[int]]:
    llm = LLM(EngineConfig(model=model, attention_backend=backend, dtype=dtype,
                           max_model_len=512, num_kv_blocks=64, max_num_seqs=4))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    tokens = [out.token_ids for out in llm.generate(PROMPTS, params)]
    llm.close()
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    runs = {b: greedy(args.model, b, args.dtype, args.max_tokens) for b in ("triton", "torch")}
    rows = []
    for i, prompt in enumerate(PROMPTS):
        triton, ref = runs["triton"][i], runs["torch"][i]
        same = next((j for j, (a, b) in enumerate(zip(triton, ref)) if a != b), len(ref))
        token, count = Counter(triton).most_common(1)[0]
        rows.append([prompt[:40], f"{same}/{len(ref)}", f"{token} x{count}", triton[:8]])
    print(markdown_table(["prompt", "triton = torch up to", "triton's commonest token",
                          "triton's first tokens"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f)


if __name__ == "__main__":
    main()
