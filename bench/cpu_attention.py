"""CPU decode attention cases for bench/kernel_bench.py: the fused C++ kernel against the
gather + bmm path of the torch backend, on SmolLM2-135M's attention shapes."""
from __future__ import annotations

import statistics
import time

import torch

from bench.kernel_cases import DecodeCase, _decode_meta, paged_cache
from kernels.reference import paged_decode_ref
from workers.engine import cpu_attention
from workers.engine.attention import TorchBackend
from workers.engine.cpu_attention import CpuBackend

SMOLLM2 = {"heads": 9, "kv_heads": 3, "head_dim": 64, "block_size": 16}


def timed_ms(fn, min_runs: int = 5, min_s: float = 1.0) -> float:
    """Median wall milliseconds over at least `min_runs` calls and `min_s` seconds."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_s:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def bench_cpu_decode(case: DecodeCase) -> list[str]:
    k_cache, v_cache, tables = paged_cache(case.batch, case.context, case.kv_heads,
                                           case.head_dim, case.block_size, case.dtype, "cpu")
    lens = torch.full((case.batch,), case.context, dtype=torch.int32)
    q = torch.randn(case.batch, case.heads, case.head_dim, dtype=case.dtype)
    scale = case.head_dim ** -0.5
    meta = _decode_meta(tables, lens)
    kv_bytes = 2 * case.batch * case.context * case.kv_heads * case.head_dim * \
        k_cache.element_size()
    label = f"{case.batch} x {case.context}"
    dtype = str(case.dtype).removeprefix("torch.")
    backends = [("torch backend: gather + bmm", TorchBackend())]
    if cpu_attention.load() is not None:
        backends.append(("ours: fused C++ paged decode", CpuBackend()))
    ref = paged_decode_ref(q[:4], k_cache, v_cache, tables[:4], lens[:4], scale)
    rows, base = [], None
    with torch.inference_mode():
        for name, backend in backends:
            out = backend.attention(q, k_cache, v_cache, meta, scale)
            torch.testing.assert_close(out[:4].float(), ref.float(), atol=3e-2, rtol=3e-2)
            ms = timed_ms(lambda b=backend: b.attention(q, k_cache, v_cache, meta, scale))
            base = base or ms
            rows.append(f"| {name} | {label} | {dtype} | {ms:.2f} | {kv_bytes / ms / 1e6:.1f} | "
                        f"{base / ms:.1f}x |")
    return rows


def cpu_decode_report() -> str:
    threads = torch.get_num_threads()
    lines = [(f"Decode attention on the CPU ({threads} thread{'s' if threads > 1 else ''}), "
              "SmolLM2-135M's heads (9 query, 3 KV, head_dim 64, block 16), blocks scattered "
              "at random, every sequence at the full context; GB/s = K + V bytes read once / "
              "time. Median of repeated calls; other processes shared the cores."), "",
             "| path | batch x context | dtype | time (ms) | GB/s | speed-up |",
             "|---|---|---|---|---|---|"]
    for dtype in (torch.float32, torch.bfloat16):
        for batch, context in ((64, 512), (16, 2048)):
            lines += bench_cpu_decode(DecodeCase(batch=batch, context=context, dtype=dtype,
                                                 **SMOLLM2))
    return "\n".join(lines)
