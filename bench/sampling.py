"""Sampling on a CPU: the C++ extension against the sampler's PyTorch path.

Real next-token logits of SmolLM2 (its forward over the README) in batches of 32 and 256 rows,
sampled with the settings clients send: temperature alone (the OpenAI default), top-p, top-k
with top-p, min-p. Each setting is timed with the sampler as it runs on a CPU (the extension)
and with the extension switched off (PyTorch: a sort of every row for top-p, then the
cumulative sum and a search for the draw), in the same process on the same rows. Prints a
table and writes its section of bench/RESULTS.md.

    python bench/sampling.py
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.results import markdown_table, update_section
from workers.engine import cpu_sampling
from workers.engine.sampler import Sampler
from workers.engine.sampling_params import SamplingParams
from workers.engine.sequence import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "smollm2-135m-instruct")
SETTINGS = [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9),
            dict(temperature=1.0, top_p=0.95), dict(temperature=0.8, top_k=40, top_p=0.95),
            dict(temperature=1.0, min_p=0.05)]
BATCHES = [32, 256]
REPEATS = 5


def model_logits(positions: int = 800) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    with open(os.path.join(ROOT, "README.md")) as f:
        ids = tokenizer.encode(f.read())[:positions]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def time_sampler(logits: torch.Tensor, settings: dict) -> float:
    """Median ms of one sampler call on these rows."""
    rows, vocab = logits.shape
    sampler = Sampler(vocab, frozenset(), max_num_seqs=rows, device=torch.device("cpu"))
    params = SamplingParams(max_tokens=16, **settings)
    seqs = [Sequence(f"s{i}", [1], params) for i in range(rows)]
    sampler(logits.clone(), seqs)
    times = []
    for _ in range(REPEATS):
        scratch = logits.clone()
        start = time.perf_counter()
        sampler(scratch, seqs)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    extension = cpu_sampling.load
    if extension() is None:
        sys.exit("the C++ sampling extension did not build on this machine")
    logits = model_logits()
    rows = []
    for batch in BATCHES:
        picked = logits[torch.randperm(logits.shape[0], generator=torch.Generator()
                                       .manual_seed(batch))[:batch]]
        for settings in SETTINGS:
            cpu_sampling.load = lambda: None  # type: ignore[assignment]
            pytorch = time_sampler(picked, settings)
            cpu_sampling.load = extension
            ours = time_sampler(picked, settings)
            rows.append([str(batch), ", ".join(f"{k} {v}" for k, v in settings.items()),
                         f"{pytorch:.1f}", f"{ours:.2f}", f"{pytorch / ours:.0f}x"])
    body = markdown_table(["rows", "sampling", "PyTorch ms", "C++ extension ms", "speed-up"],
                          rows)
    print(body)
    update_section("Sampling on a CPU", (
        "`python bench/sampling.py`: one sampler call on real SmolLM2 next-token logits "
        f"({logits.shape[1]} tokens) over this README, {torch.get_num_threads()} threads, median "
        f"of {REPEATS}. The C++ extension (`workers/engine/cpu_sampling.cpp`) finds the top-k, "
        "top-p and min-p cuts on a histogram of each row's weights and draws in a few passes; "
        "the PyTorch path sorts every row for top-p (as on a GPU), then draws by a cumulative "
        "sum and a search. Both draw once per row.\n\n" + body))


if __name__ == "__main__":
    main()
