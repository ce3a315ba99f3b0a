"""The engine's per-step host time, with a model whose forward costs nothing.

The real scheduler, block manager, model runner input preparation, sampler, detokenizer (with
the real SmolLM2 tokenizer) and output objects run; only the model is a stand-in that returns
the same hidden rows and fixed logits of the real shape [rows, 49152]. What a step then costs
is what the host adds around the forward: at a few ms per GPU decode step it sets the pace.

The greedy argmax over those logits runs on this CPU, standing in for the device, and is
subtracted. Where its input comes from matters: with a distinct row per request it streams
50 MB at batch 256 through the caches the host's data and code live in, which a GPU's memory
never does. So each scenario runs twice: with one logits row per step shared by the batch
(the argmax reads the real shape from the caches it leaves warm: the GPU case) and with a
distinct row per request (what the CPU engine itself meets after its forward).

Per scenario (batch 1, 64 and 256 decodes, and 64 decodes with a 2,048-token prefill joining
every step) it prints the median wall time of one `step()` and a breakdown per phase, taken
in a further pass with each phase's functions timed (the timers' own cost lands in "other").
On this machine the same code's figures are steady within a process but differ by up to a
third between processes, so every figure is the median over `--rounds` fresh processes,
alternating engines when comparing.

    python bench/host_overhead.py                  # this checkout
    python bench/host_overhead.py --compare main   # also a git ref, same run: before/after
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "smollm2-135m-instruct")
SCENARIOS = [  # (name, decodes, prefill tokens joining each step, timed steps)
    ("decode x1", 1, 0, 300),
    ("decode x64", 64, 0, 120),
    ("decode x256", 256, 0, 60),
    ("decode x64 + 2k prefill", 64, 2048, 30),
]
PROMPT_LEN = 64
WARMUP_STEPS = 12


def zero_cost_model(vocab_size: int, hidden_size: int, max_rows: int):
    """A CausalLM stand-in: no layers, no KV, fixed logits rows (rotated every step, so the
    sampled tokens and the text they decode to vary); `distinct_rows`: one per request, else one
    shared by the batch."""
    import torch
    from torch import nn

    class ZeroCostModel(nn.Module):
        def __init__(self, cfg, backend, ctx=None) -> None:
            super().__init__()
            self.cfg = cfg
            self.stage: list[int] = []  # no layers: the runner allocates no KV cache
            self.embed_tokens = None
            self.lm_head = nn.Identity()  # not None: nothing to tie
            self.register_buffer("rope_cache", torch.zeros(1), persistent=False)
            gen = torch.Generator().manual_seed(0)
            self.fixed_logits = torch.randn(2 * max_rows, vocab_size, generator=gen)
            self.hidden = torch.zeros(1, hidden_size)
            self.calls = 0
            self.distinct_rows = False

        def forward(self, input_ids, positions, kv_caches, meta, intermediate=None):
            self.calls += 1
            return self.hidden.expand(input_ids.shape[0], -1)

        def compute_logits(self, hidden):
            offset = self.calls % max_rows
            if self.distinct_rows:
                return self.fixed_logits[offset:offset + hidden.shape[0]]
            return self.fixed_logits[offset:offset + 1].expand(hidden.shape[0], -1)

    return ZeroCostModel


def build_engine(max_num_seqs: int, max_batched: int, overlap: bool):
    """An LLMEngine over the stand-in model (patched in where the runner builds its model)."""
    import workers.engine.model_runner as model_runner
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine

    config = EngineConfig(model=MODEL, device="cpu", dtype="float32", max_model_len=4096,
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched,
                          num_kv_blocks=16384, enable_prefix_caching=True, num_threads=1,
                          **({"async_scheduling": True} if overlap else {}))
    hf = config.hf_config
    model_runner.CausalLM = zero_cost_model(hf["vocab_size"], hf["hidden_size"], max_num_seqs + 8)
    model_runner.load_weights = lambda model, path: None
    return LLMEngine(config)


def phase_targets(engine) -> dict[str, list[tuple[object, str]]]:
    """Where each phase's time is spent: (object or class, method name); missing ones skipped."""
    from workers.engine import detokenizer, llm_engine

    try:
        from workers.engine.step_outputs import StepOutputs
        outputs: list[tuple[object, str]] = [(StepOutputs, "add")]
    except ImportError:  # a git ref from before steps recorded their outputs (--compare)
        outputs = [(llm_engine, "request_output")]
    runner = engine.runner
    return {
        "schedule": [(engine.scheduler, "schedule")],
        "prepare": [(runner, "prepare"), (runner, "inputs")],
        "forward": [(runner.model, "forward"), (runner.model, "compute_logits")],
        # the sampler's device-side half where it has one (overlapped steps call only that)
        "sample": [(engine.sampler, "sample" if hasattr(engine.sampler, "sample") else "__call__")],
        "detokenize+stop": [(detokenizer.Detokenizer, "add_token")],
        "outputs": outputs,
    }


def instrument(engine, totals: dict[str, float]) -> None:
    """Wrap every phase's functions with a timer adding into totals[phase]."""
    for phase, targets in phase_targets(engine).items():
        for owner, name in targets:
            fn = getattr(owner, name, None)
            if fn is None:
                continue

            def timed(*args, _fn=fn, _phase=phase, **kwargs):
                start = time.perf_counter()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    totals[_phase] += time.perf_counter() - start

            if name == "__call__":  # looked up on the type, not the instance
                owner.__class__ = type(owner.__class__.__name__, (owner.__class__,),
                                       {"__call__": lambda self, *a, _t=timed, **k: _t(*a, **k)})
            elif isinstance(owner, type):
                setattr(owner, name, lambda self, *a, _t=timed, **k: _t(self, *a, **k))
            else:
                setattr(owner, name, timed)


def run_scenario(engine, decodes: int, prefill: int, steps: int, corpus: list[int],
                 rng: random.Random, totals: dict[str, float], one_row: bool = False
                 ) -> list[tuple[float, float, float]]:
    """(seconds, seconds in argmax, seconds reading its outputs afterwards) per timed
    step, each step's full `step()` (and the stand-in's ~0 forward); totals holds the phase
    times of the timed steps only. `one_row`: see ArgmaxTimer."""
    from workers.engine.sampling_params import SamplingParams

    budget = WARMUP_STEPS + steps + 8
    params = SamplingParams(temperature=0, max_tokens=budget, ignore_eos=True)
    for i in range(decodes):
        start = rng.randrange(0, len(corpus) - PROMPT_LEN)
        engine.add_request(f"d{i}", corpus[start:start + PROMPT_LEN], params)
    for _ in range(WARMUP_STEPS):  # every prompt prefilled: from here on, decodes only
        engine.step()
    one_token = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    times = []
    totals.clear()
    for s in range(steps):
        if prefill:  # fresh tokens: no prefix-cache hit
            engine.add_request(f"p{s}", [rng.randrange(100, 40000) for _ in range(prefill)],
                               one_token)
        with ArgmaxTimer(one_row) as kernel:
            start = time.perf_counter()
            outputs = engine.step()
            step = time.perf_counter() - start
        start = time.perf_counter()
        for out in outputs:  # built and decoded on read (no stop strings): the reader's time
            out.text  # noqa: B018
        times.append((step, kernel.seconds, time.perf_counter() - start))
    timed = dict(totals)
    engine.abort_all()
    while engine.has_unfinished():
        engine.step()
    totals.clear()
    totals.update(timed)
    return times


class ArgmaxTimer:
    """Times every `Tensor.argmax` while active: greedy sampling's one vocabulary-wide kernel,
    device work (microseconds on a GPU, milliseconds on one CPU thread) charged to no host
    phase. Timed inline, in the same step, so a busy machine skews both sides alike.

    `one_row`: where every row is the same one (the shared logits row), reduce that row once
    and repeat its result, the same tokens without the 10 ms kernel, so the host figure is not
    the difference of two numbers ten times its size."""

    def __init__(self, one_row: bool = False) -> None:
        import torch

        self.tensor = torch.Tensor
        self.original = torch.Tensor.argmax
        self.one_row = one_row
        self.seconds = 0.0

    def __enter__(self) -> ArgmaxTimer:
        original = self.original

        def argmax(tensor, *args, **kwargs):
            start = time.perf_counter()
            try:
                if self.one_row and tensor.dim() == 2 and tensor.stride(0) == 0 and \
                        (args or (kwargs.get("dim"),))[0] in (-1, 1):
                    first = original(tensor[:1], *args, **kwargs)
                    return first.expand(tensor.shape[0], *first.shape[1:]).contiguous()
                return original(tensor, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        self.tensor.argmax = argmax
        return self

    def __exit__(self, *exc) -> None:
        self.tensor.argmax = self.original


def measure(overlap: bool = False) -> dict[str, dict[str, float]]:
    """Per scenario: median ms per step, the host part of it, and ms per step in each phase."""
    engine = build_engine(max_num_seqs=256, max_batched=4096, overlap=overlap)
    with open(os.path.join(ROOT, "README.md")) as f:
        corpus = engine.tokenizer.encode(f.read())
    results: dict[str, dict[str, float]] = {}
    totals: dict[str, float] = defaultdict(float)
    model = engine.runner.model
    for name, decodes, prefill, steps in SCENARIOS:
        times = run_scenario(engine, decodes, prefill, steps, corpus, random.Random(0), totals)
        model.distinct_rows = True
        distinct = run_scenario(engine, decodes, prefill, steps, corpus, random.Random(0),
                                totals)
        model.distinct_rows = False
        one_row = run_scenario(engine, decodes, prefill, steps, corpus, random.Random(0),
                               totals, one_row=True)
        results[name] = {"step": 1e3 * statistics.median(t for t, _, _ in times),
                         "argmax": 1e3 * statistics.median(k for _, k, _ in times),
                         "host": 1e3 * statistics.median(t - k for t, k, _ in times),
                         "host distinct": 1e3 * statistics.median(t - k for t, k, _ in distinct),
                         "host one row": 1e3 * statistics.median(t - k for t, k, _ in one_row),
                         "read": 1e3 * statistics.median(r for _, _, r in times)}
    instrument(engine, totals)
    for name, decodes, prefill, steps in SCENARIOS:
        times = run_scenario(engine, decodes, prefill, steps, corpus, random.Random(0), totals)
        ms = {phase: 1e3 * t / steps for phase, t in totals.items()}
        ms["other"] = 1e3 * sum(t for t, _, _ in times) / steps - sum(ms.values())
        results[name].update(ms)
    engine.close()
    results[SAMPLED] = {"host": sampler_ms()}
    return results


SAMPLED = "sampling x256, temperature + top-k + top-p"


def sampler_ms(rows: int = 256, vocab: int = 32, steps: int = 300) -> float:
    """Median ms of the sampler alone on a batch that samples (temperature 0.8, top-k 40,
    top-p 0.95): logits of a 32-token vocabulary keep the device work small, so this is
    what the sampler adds on the host per step."""
    import inspect

    import torch

    from workers.engine.sampler import Sampler
    from workers.engine.sampling_params import SamplingParams
    from workers.engine.sequence import Sequence

    where = {"max_num_seqs": rows, "device": torch.device("cpu")} \
        if "device" in inspect.signature(Sampler).parameters else {}  # refs before its rows
    sampler = Sampler(vocab, frozenset(), **where)
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, max_tokens=100)
    seqs = [Sequence(f"s{i}", [1, 2, 3], params) for i in range(rows)]
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(steps + 20):
        scratch = logits.clone()
        start = time.perf_counter()
        sampler(scratch, seqs)
        if i >= 20:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure_process(root: str, overlap: bool) -> dict[str, dict[str, float]]:
    """`measure` on the engine under root, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": root}
    flags = ["--async-scheduling"] if overlap else []
    out = subprocess.run([sys.executable, __file__, "--json", "--root", root, *flags],
                         env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_of(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per scenario and figure, the median over rounds."""
    return {name: {key: statistics.median(r[name][key] for r in rounds) for key in figures}
            for name, figures in rounds[0].items()}


def measure_rounds(ref: str | None, rounds: int, overlap: bool
                   ) -> tuple[list[dict], list[dict]]:
    """Each round measures this checkout and, with ref, a checkout of that git ref, each in
    a fresh process, alternating which goes first (ABBA): on this machine the same code's
    figures differ by up to a third between processes, so one process each would compare
    those differences as much as the engines."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "tree")
        if ref:
            subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, ref],
                           check=True, capture_output=True)
            os.symlink(os.path.join(ROOT, "models"), os.path.join(tree, "models"))
        try:
            here: list[dict] = []
            there: list[dict] = []
            for r in range(rounds):
                order = [(ROOT, here), (tree, there)] if ref else [(ROOT, here)]
                for root, into in (order if r % 2 == 0 else order[::-1]):
                    into.append(measure_process(root, overlap))
        finally:
            if ref:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree],
                               check=False, capture_output=True)
    return here, there


PHASES = ["schedule", "prepare", "forward", "sample", "detokenize+stop", "outputs", "other"]


def table(results: dict, before: dict | None, ref: str) -> str:
    from bench.results import markdown_table

    headers = ["scenario", "host ms/step"]
    headers += [f"at {ref}", "speed-up"] if before else []
    headers += ["host ms/step, distinct rows"]
    headers += [f"at {ref}", "speed-up"] if before else []
    headers += ["host ms/step, argmax of one row"]
    headers += [f"at {ref}", "speed-up"] if before else []
    headers += ["step ms", "argmax kernel ms", "read ms"] + [f"{p} ms" for p in PHASES]
    rows = []
    for name, r in results.items():
        if name == SAMPLED:
            continue
        row = [name]
        for key in ("host", "host distinct", "host one row"):
            row.append(f"{r[key]:.3f}")
            if before:
                row += [f"{before[name][key]:.3f}", f"{before[name][key] / r[key]:.1f}x"]
        row += [f"{r['step']:.3f}", f"{r['argmax']:.3f}", f"{r['read']:.3f}"]
        rows.append(row + [f"{r.get(p, 0.0):.3f}" for p in PHASES])
    sampled = [[SAMPLED, f"{results[SAMPLED]['host']:.3f}"]
               + ([f"{before[SAMPLED]['host']:.3f}",
                   f"{before[SAMPLED]['host'] / results[SAMPLED]['host']:.1f}x"] if before else [])]
    return markdown_table(headers, rows) + "\n\nThe sampler alone, on a batch that samples (" \
        "logits of a 32-token vocabulary, so the device work is small):\n\n" + markdown_table(
            ["batch", "sampler ms/step"] + ([f"at {ref}", "speed-up"] if before else []),
            sampled)


def spread(here: list[dict], there: list[dict], ref: str | None) -> str:
    """Each round's host ms/step at batch 256: how far processes differed during the run."""
    def rounds(results: list[dict], key: str) -> str:
        return ", ".join(f"{r['decode x256'][key]:.3f}" for r in results)

    lines = []
    for key, what in (("host", "host ms/step"), ("host one row", "argmax of one row")):
        line = f"{what} at decode x256, round by round: {rounds(here, key)}"
        lines.append(line + (f"; at {ref}: {rounds(there, key)}." if there else "."))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", help="also measure this git ref's engine, same run")
    parser.add_argument("--json", action="store_true", help="print results as JSON only")
    parser.add_argument("--async-scheduling", action="store_true",
                        help="overlapped steps (on CPU the same work in another order)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="fresh processes per side; figures are medians over them")
    parser.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json:
        sys.path.insert(0, args.root)
        print(json.dumps(measure(args.async_scheduling)))
        return
    sys.path.insert(0, ROOT)
    here, there = measure_rounds(args.compare, args.rounds, args.async_scheduling)
    results = median_of(here)
    before = median_of(there) if there else None
    body = table(results, before, args.compare) + "\n\n" + spread(here, there, args.compare)
    print(body)
    from bench.results import update_section

    title = "Engine host overhead per step (stand-in model, no forward)"
    flags = (f" --compare {args.compare}" if args.compare else "") + \
        (" --async-scheduling" if args.async_scheduling else "") + \
        (f" --rounds {args.rounds}" if args.rounds != 3 else "")
    update_section(title + (", overlapped steps" if args.async_scheduling else ""), (
        f"`python bench/host_overhead.py{flags}`"
        + ": one engine step with a model whose forward costs nothing (fixed logits of the "
        "real [rows, 49152] shape), so every millisecond is host work: scheduling, input "
        "preparation, sampling, detokenization and stop checks, output records. Each figure "
        "is the median over rounds, each round a fresh process per engine, the engines' "
        "order alternating (figures differ between processes). Host = median "
        "over steps of the step minus its greedy argmax over [rows, 49152] logits (device "
        "work on a GPU, timed inline). In `host ms/step` the batch shares one logits row per "
        "step, so the argmax leaves the caches warm as a GPU does; in `distinct rows` every "
        "request has its own row and the argmax first streams 50 MB (at 256) through the "
        "caches the host work then runs cold in, as the CPU engine's real forward does. In "
        "`argmax of one row` the shared row is reduced once and its token repeated (the same "
        "tokens): no 10 ms kernel in the step, so the host time is not read as the "
        "difference of two figures ten times its size. "
        "Read = building every output object and decoding its text after the step, done by "
        "the reader (the replica's event loop) while the engine runs the next step; not part "
        "of host. Phase columns come from a further, instrumented pass (ms per step; `sample` "
        "includes the argmax; timer cost lands in other). One CPU thread for torch.\n\n"
        + body))


if __name__ == "__main__":
    main()
