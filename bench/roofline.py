"""The time a workload needs at this device's limits, from the batches the engine really ran.

Each step costs at least max(FLOPs / matmul peak, bytes / copy bandwidth): FLOPs of the linear
layers over its tokens (lm_head over its sampled rows only) plus attention over each row's
context; bytes of the weights read once plus every sequence's K/V read once. Peak and bandwidth
are measured in the same process, with the same threads, right before the workload runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from workers.engine.model import ModelConfig


def _best_seconds(fn, repeats: int = 5) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(dtype: torch.dtype, device: str, fp8: bool = False) -> float:
    """Best FLOP/s over a large square matmul and decode-like shapes; with fp8, of the row-wise
    scaled E4M3 matmul FP8 weights run (on CUDA; elsewhere they run in `dtype`)."""
    from workers.engine.fp8 import FP8, scaled_mm_supported

    shapes = [(2048, 2048, 2048), (64, 576, 3072), (512, 576, 3072)]
    if torch.device(device).type == "cuda":  # a GPU needs bigger matmuls to reach its peak
        shapes += [(8192, 8192, 8192), (4096, 4096, 14336)]
    peak = 0.0
    with torch.inference_mode():
        for m, k, n in shapes:
            a = torch.randn(m, k, dtype=dtype, device=device)
            b = torch.randn(n, k, dtype=dtype, device=device)
            if fp8 and scaled_mm_supported(a.device, k, n):
                a, b = a.to(FP8), b.to(FP8)
                sa = torch.ones(m, 1, device=device)
                sb = torch.ones(1, n, device=device)
                fn = lambda a=a, b=b, sa=sa, sb=sb: torch._scaled_mm(  # noqa: E731
                    a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
            else:
                fn = lambda a=a, b=b: F.linear(a, b)  # noqa: E731
            peak = max(peak, 2 * m * k * n / _best_seconds(fn))
    return peak


def copy_bandwidth(device: str, nbytes: int | None = None) -> float:
    """Bytes read + written per second copying a buffer far larger than the caches."""
    nbytes = nbytes or (2**31 if torch.device(device).type == "cuda" else 2**28)
    src = torch.empty(nbytes // 2, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src))


# what the engine tables' roofline, outside-forward and device-idle columns mean
COLUMNS_NOTE = (
    "Roofline: per engine step, max(FLOPs / matmul peak, (weights + K/V bytes read) / copy "
    "bandwidth), summed over the steps this run took (`bench/roofline.py`). Outside forward: "
    "share of engine step time spent scheduling, preparing the batch, sampling, detokenizing "
    "and checking stops (with overlapped steps the host also waits there for the device). "
    "Device idle (CUDA): share of the run's wall time outside the forwards' device time (CUDA "
    "events around each).")


@dataclass
class StepRecorder:
    """Wraps a ModelRunner's execute to log each batch: (new tokens, context before, sampled);
    on CUDA also a pair of events around each forward, whose sum is the device's busy time
    (the host's share shows as the rest of the wall time, overlapped steps or not)."""

    steps: list[list[tuple[int, int, bool]]] = field(default_factory=list)
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)

    def attach(self, runner) -> None:
        execute = runner.execute
        timed = runner.device.type == "cuda"

        def recorded(batch, *args):  # overlapped steps also pass the tokens in flight
            self.steps.append([(n, s.num_computed_tokens, s.num_computed_tokens + n
                                == s.num_tokens) for s, n in zip(batch.seqs,
                                                                batch.num_new_tokens)])
            if not timed:
                return execute(batch, *args)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = execute(batch, *args)
            end.record()
            self.events.append((start, end))
            return out

        runner.execute = recorded

    def device_seconds(self) -> float | None:
        """Seconds the device spent in the recorded forwards (None off CUDA)."""
        if not self.events:
            return None
        torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in self.events) / 1e3


def roofline_seconds(steps, cfg: ModelConfig, itemsize: int, peak_flops: float,
                     bandwidth: float, linear_itemsize: int | None = None,
                     kv_itemsize: int | None = None) -> float:
    """linear_itemsize: bytes per weight of the decoder layers' linears (1 in FP8), and
    kv_itemsize bytes per cached key or value (1 in an FP8 cache), when they differ from
    `itemsize` (the embeddings and LM head)."""
    d, h, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer_params = d * (h + 2 * kv) + h * d + 3 * d * cfg.intermediate_size
    linear_params = cfg.num_layers * layer_params
    head_params = cfg.vocab_size * d
    kv_bytes_per_token = 2 * cfg.num_layers * kv * (kv_itemsize or itemsize)
    weight_bytes = linear_params * (linear_itemsize or itemsize) + head_params * itemsize
    total = 0.0
    for rows in steps:
        tokens = sum(n for n, _, _ in rows)
        sampled = sum(s for _, _, s in rows)
        # each new token attends to the cached context and the new tokens up to itself
        pairs = sum(n * c + n * (n + 1) // 2 for n, c, _ in rows)
        flops = 2 * (linear_params * tokens + head_params * sampled) + \
            4 * cfg.num_layers * h * pairs
        kv_read = sum(n + c for n, c, _ in rows) * kv_bytes_per_token
        total += max(flops / peak_flops, (weight_bytes + kv_read) / bandwidth)
    return total
