"""CPU decode attention cases for bench/kernel_bench.py: the fused C++ kernel against the
gather + bmm path of the torch backend (and, with a git revision, the kernel as it was there),
on SmolLM2-135M's attention shapes.

The blocks live in a pool larger than the last-level cache and every call reads a different
set of them, as the engine's layers do in turn, so K and V come from DRAM as they do in a step.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from types import ModuleType

import torch

from bench.kernel_cases import _decode_meta
from kernels.reference import paged_decode_ref
from workers.engine import cpu_attention, cpu_extension
from workers.engine.attention import TorchBackend

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16  # SmolLM2-135M
POOL_BYTES = 256 << 20  # K + V, well past a 32 MiB L3
CASES = [(1, 512), (8, 512), (32, 512), (64, 512)]


def timed_ms(fn, min_runs: int = 10, min_s: float = 1.0) -> float:
    """Median wall milliseconds over at least `min_runs` calls and `min_s` seconds."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_s:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def baseline_kernel(rev: str) -> ModuleType:
    """The C++ kernel as it was at git revision `rev`, built beside ours."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(["git", "show", f"{rev}:workers/engine/cpu_paged_decode.cpp"],
                            cwd=root, check=True, capture_output=True, text=True).stdout
    folder = tempfile.mkdtemp()
    headers = subprocess.run(["git", "ls-tree", "--name-only", rev, "workers/engine/"], cwd=root,
                             check=True, capture_output=True, text=True).stdout.split()
    for header in (h for h in headers if h.endswith(".h")):  # what the source includes
        with open(os.path.join(folder, os.path.basename(header)), "w") as f:
            f.write(subprocess.run(["git", "show", f"{rev}:{header}"], cwd=root, check=True,
                                   capture_output=True, text=True).stdout)
    path = os.path.join(folder, "cpu_paged_decode_baseline.cpp")
    with open(path, "w") as f:
        f.write(source)
    return cpu_extension.build(f"{cpu_attention.NAME}_baseline", path)


class Case:
    """A batch at one context length whose block tables cycle through a large pool."""

    def __init__(self, batch: int, context: int, dtype: torch.dtype) -> None:
        per_seq = -(-context // BLOCK)
        block_bytes = 2 * BLOCK * KV_HEADS * HEAD_DIM * dtype.itemsize
        sets = max(1, POOL_BYTES // block_bytes // (batch * per_seq))
        shape = (sets * batch * per_seq, BLOCK, KV_HEADS, HEAD_DIM)
        self.k_cache = torch.randn(shape, dtype=dtype)
        self.v_cache = torch.randn(shape, dtype=dtype)
        perm = torch.randperm(shape[0]).to(torch.int32)
        self.tables = list(perm.view(sets, batch, per_seq))
        self.lens = torch.full((batch,), context, dtype=torch.int32)
        self.q = torch.randn(batch, HEADS, HEAD_DIM, dtype=dtype)
        self.kv_bytes = batch * context * block_bytes // BLOCK
        self.calls = 0

    def next_tables(self) -> torch.Tensor:
        self.calls += 1
        return self.tables[self.calls % len(self.tables)]

    def check(self, out: torch.Tensor, tables: torch.Tensor) -> None:
        ref = paged_decode_ref(self.q, self.k_cache, self.v_cache, tables, self.lens,
                               HEAD_DIM ** -0.5)
        torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


def paths(baseline: ModuleType | None, rev: str | None) -> list[tuple[str, object]]:
    """(name, fn(case, tables) -> out) for each path measured."""
    torch_backend = TorchBackend()

    def gather_bmm(c: Case, tables: torch.Tensor) -> torch.Tensor:
        return torch_backend.attention(c.q, c.k_cache, c.v_cache, _decode_meta(tables, c.lens),
                                       HEAD_DIM ** -0.5)

    found: list[tuple[str, object]] = [("torch backend: gather + bmm", gather_bmm)]
    for name, ext in ((f"C++ kernel at {rev}", baseline), ("C++ kernel", cpu_attention.load())):
        if ext is not None:
            found.append((name, lambda c, t, e=ext: e.paged_decode(c.q, c.k_cache, c.v_cache, t,
                                                                   c.lens, HEAD_DIM ** -0.5)))
    return found


def cpu_decode_report(baseline_rev: str | None = None) -> str:
    threads = torch.get_num_threads()
    baseline = baseline_kernel(baseline_rev) if baseline_rev else None
    lines = [(f"Decode attention on the CPU ({threads} thread{'s' if threads > 1 else ''}), "
              f"SmolLM2-135M's heads ({HEADS} query, {KV_HEADS} KV, head_dim {HEAD_DIM}, block "
              f"{BLOCK}). Blocks are scattered at random over a {POOL_BYTES >> 20} MiB K + V pool "
              "and each call reads a different part of it, so K and V come from DRAM as in an "
              "engine step; GB/s = K + V bytes read once / time. Median of repeated calls."), "",
             "| path | batch x context | dtype | time (ms) | GB/s | speed-up |",
             "|---|---|---|---|---|---|"]
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float32):
            for batch, context in CASES:
                lines += bench_case(Case(batch, context, dtype), paths(baseline, baseline_rev))
    return "\n".join(lines)


def bench_case(case: Case, fns: list[tuple[str, object]]) -> list[str]:
    rows, base = [], None
    for name, fn in fns:
        tables = case.next_tables()
        case.check(fn(case, tables), tables)
        ms = timed_ms(lambda f=fn: f(case, case.next_tables()))
        base = base or ms
        rows.append(f"| {name} | {case.lens.numel()} x {int(case.lens[0])} | "
                    f"{str(case.q.dtype).removeprefix('torch.')} | {ms:.3f} | "
                    f"{case.kv_bytes / ms / 1e6:.1f} | {base / ms:.1f}x |")
    return rows
