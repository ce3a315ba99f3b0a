"""The fused C++ layer ops in the CPU engine against the torch references they replace.

One engine (SmolLM2-135M, the configured dtype, every core) runs decode steps at batch 1, 32
and 64 and 1,024-token prefill steps, switching its backend between the references and the
fused ops every round, so both are measured in the same run on the same state. Per decode step
it reports what residual add + RMSNorm, RoPE with the K/V cache write, and SiLU-and-mul cost
(each backend call timed from Python, as the model sees it) and the whole step's wall time.

    python bench/cpu_layer_ops.py    # prints the table and writes its bench/RESULTS.md section
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.results import markdown_table, update_section  # noqa: E402
from workers.engine.config import EngineConfig  # noqa: E402
from workers.engine.llm_engine import LLMEngine  # noqa: E402
from workers.engine.sampling_params import SamplingParams  # noqa: E402

MODEL = os.path.join(ROOT, "models", "smollm2-135m-instruct")
OPS = ("rms_norm", "rope_write_kv", "silu_mul")
MODES = {False: "torch references", True: "fused C++"}
PROMPT_LEN, PREFILL_LEN = 158, 1024


def timed(backend) -> Counter:
    """Seconds spent in each of the backend's layer ops, accumulated per call."""
    spent: Counter = Counter()
    for name in OPS:
        op = getattr(backend, name)

        def wrapper(*args, _op=op, _name=name):
            start = time.perf_counter()
            result = _op(*args)
            spent[_name] += time.perf_counter() - start
            return result
        setattr(backend, name, wrapper)
    return spent


def decode(engine: LLMEngine, spent: Counter, batch: int, rounds: int, steps: int) -> dict:
    """Per mode: median per-step ms of each op and of the whole step, over alternating rounds."""
    params = SamplingParams(temperature=0, max_tokens=512, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"d{batch}-{i}", [1000 + i + t for t in range(PROMPT_LEN)], params)
    while any(len(s.output_token_ids) < 2 for s in engine.scheduler.running) or \
            engine.scheduler.waiting:
        engine.step()
    samples: dict = {mode: [] for mode in MODES}
    for _ in range(rounds):
        for mode in MODES:
            engine.runner.backend.fused = mode
            engine.step()  # the first step after a switch is not timed
            spent.clear()
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            wall = time.perf_counter() - start
            samples[mode].append({**{op: spent[op] / steps for op in OPS}, "step": wall / steps})
    engine.abort_all()
    return {mode: {key: 1e3 * statistics.median(s[key] for s in runs) for key in runs[0]}
            for mode, runs in samples.items()}


def prefill(engine: LLMEngine, rounds: int) -> dict:
    """Per mode: median ms of a step that prefills one fresh 1,024-token prompt."""
    params = SamplingParams(temperature=0, max_tokens=1)
    rng = random.Random(0)
    times: dict = {mode: [] for mode in MODES}
    for r in range(rounds):
        for mode in MODES:
            engine.runner.backend.fused = mode
            prompt = [rng.randrange(100, 40000) for _ in range(PREFILL_LEN)]  # no cached prefix
            engine.add_request(f"p{r}-{mode}", prompt, params)
            start = time.perf_counter()
            engine.step()
            times[mode].append(time.perf_counter() - start)
    return {mode: 1e3 * statistics.median(t) for mode, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-write", action="store_true", help="leave bench/RESULTS.md alone")
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(model=MODEL, device="cpu", dtype=args.dtype,
                                    max_num_seqs=64, max_model_len=2048))
    backend = engine.runner.backend
    if not hasattr(backend, "fused") or not backend.fused:
        sys.exit("the fused CPU layer ops are unavailable here (backend "
                 f"{backend.name!r}); nothing to compare")
    spent = timed(backend)
    rows = []
    for batch in (1, 32, 64):
        result = decode(engine, spent, batch, args.rounds, args.steps)
        ref, ours = result[False], result[True]
        total_ref, total_ours = (sum(r[op] for op in OPS) for r in (ref, ours))
        rows.append([f"decode x{batch}"] + [f"{ref[op]:.2f} / {ours[op]:.2f}" for op in OPS] +
                    [f"{total_ref:.2f} / {total_ours:.2f}", f"{total_ref / total_ours:.1f}x",
                     f"{ref['step']:.1f} / {ours['step']:.1f}"])
        print(rows[-1])
    steps = prefill(engine, args.rounds)
    rows.append([f"prefill {PREFILL_LEN}", "", "", "", "", "",
                 f"{steps[False]:.1f} / {steps[True]:.1f}"])
    print(rows[-1])
    dtype = str(engine.runner.dtype).removeprefix("torch.")
    layers = engine.runner.model_config.num_layers
    table = markdown_table(["step", "rms_norm (ms)", "rope + KV write (ms)", "silu_mul (ms)",
                            "the four ops (ms)", "speed-up", "step (ms)"], rows)
    print(table)
    if not args.no_write:
        update_section(f"CPU layer ops (engine, {dtype})", (
            f"`python bench/cpu_layer_ops.py`: SmolLM2-135M in {dtype}, {layers} layers, "
            f"{backend.name} backend, every core; each cell is torch references / fused "
            "C++ ops, per step, median of alternating rounds in one run. Op times are the "
            "backend calls timed from Python; other processes may have shared the cores.\n\n"
            + table))
    engine.close()


if __name__ == "__main__":
    main()
