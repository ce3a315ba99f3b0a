"""Top-p on a CPU: the most likely tokens first, against a sort of the whole vocabulary.

Real next-token logits of SmolLM2 (its forward over the README) in batches of 32 and 256 rows,
sampled with the temperatures and top-p values clients send. Each setting is timed with the
sampler as it is and with `TOP_P_CANDIDATES` set to the vocabulary, so every row is sorted
whole. Both run in the same process, on the same rows. Prints a table and writes its section
of bench/RESULTS.md.

    python bench/sampling.py
"""
from __future__ import annotations

import os
import statistics
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "smollm2-135m-instruct")
SETTINGS = [(0.7, 0.9), (0.8, 0.95), (1.0, 0.9), (1.0, 0.95)]  # (temperature, top_p)
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


def time_sampler(logits: torch.Tensor, temperature: float, top_p: float) -> float:
    """Median ms of one sampler call on these rows."""
    from workers.engine.sampler import Sampler
    from workers.engine.sampling_params import SamplingParams
    from workers.engine.sequence import Sequence

    rows, vocab = logits.shape
    sampler = Sampler(vocab, frozenset(), max_num_seqs=rows, device=torch.device("cpu"))
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=16)
    seqs = [Sequence(f"s{i}", [1], params) for i in range(rows)]
    sampler(logits.clone(), seqs)
    times = []
    for _ in range(REPEATS):
        scratch = logits.clone()
        start = time.perf_counter()
        sampler(scratch, seqs)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def nucleus_share(logits: torch.Tensor, temperature: float, top_p: float, limit: int) -> float:
    """Share of rows whose nucleus holds more than `limit` tokens."""
    probs = (logits / temperature).softmax(dim=-1).sort(dim=-1, descending=True).values
    size = ((probs.cumsum(dim=-1) - probs) < top_p).sum(dim=-1)
    return (size > limit).float().mean().item()


def main() -> None:
    from bench.results import markdown_table, update_section
    from workers.engine import sampler

    torch.set_num_threads(os.cpu_count() or 1)
    logits = model_logits()
    candidates = sampler.TOP_P_CANDIDATES
    rows = []
    for batch in BATCHES:
        picked = logits[torch.randperm(logits.shape[0], generator=torch.Generator()
                                       .manual_seed(batch))[:batch]]
        for temperature, top_p in SETTINGS:
            first = time_sampler(picked, temperature, top_p)
            sampler.TOP_P_CANDIDATES = logits.shape[1]
            whole = time_sampler(picked, temperature, top_p)
            sampler.TOP_P_CANDIDATES = candidates
            share = nucleus_share(picked, temperature, top_p, candidates)
            rows.append([str(batch), str(temperature), str(top_p), f"{share:.0%}",
                         f"{whole:.1f}", f"{first:.1f}", f"{whole / first:.1f}x"])
    body = markdown_table(["rows", "temperature", "top_p",
                           f"rows with a nucleus past {candidates} tokens",
                           "whole-vocabulary sort ms", f"top {candidates} first ms",
                           "speed-up"], rows)
    print(body)
    update_section("Top-p sampling on a CPU", (
        "`python bench/sampling.py`: one sampler call (temperature, top-p, exponential race) "
        f"on real SmolLM2 next-token logits ({logits.shape[1]} tokens) over this README, "
        f"{torch.get_num_threads()} threads, median of {REPEATS}. Top-p looks among the "
        f"{candidates} most likely tokens of each row first and sorts a row whole only when "
        "its nucleus runs past them; the other column sorts every row whole.\n\n" + body))


if __name__ == "__main__":
    main()
