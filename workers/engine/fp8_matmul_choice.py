"""Which FP8 matmul each Fp8Linear runs, measured once at load on the device that runs it.

Three ways compute the same product on Hopper, each summing in fp32 at full precision:
`torch._scaled_mm` with row-wise scales (a CUTLASS kernel whose smallest tile is 64 x 128 with
no split of K: at decode batch sizes few SMs stream the weights), cuBLAS's FP8 matmul with unit
scales into fp32 then scaled (cuBLAS picks its own tiles and splits), and our Triton kernel
(`kernels/fp8_matmul.py`) with several tile shapes. Which one is fastest depends on the weight's
shape, the number of rows and the library versions, so for each distinct weight shape and
each class of row counts the engine times them all, before any CUDA graph is captured, and
keeps the fastest whose output matches `_scaled_mm`'s. Timing walks every layer of a shape in
turn, so the weights come from memory as in a forward, not from the L2 cache.
"""
from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from workers.engine.fp8 import Fp8Linear, Matmul, quantize_rows, scaled_mm_rowwise

log = logging.getLogger(__name__)

ROW_CLASSES = (16, 64, 256, 1024)  # a forward of m rows runs the pick of the first class >= m
MATCH = 1e-2  # largest difference from `_scaled_mm`, relative to its largest output


@functools.cache
def _one(device: torch.device) -> torch.Tensor:
    return torch.ones((), dtype=torch.float32, device=device)


def cublas_unit_scaled(values: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor,
                       weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cuBLAS's tensor-wise FP8 matmul with scales of one, into fp32, then the row-wise scales."""
    one = _one(values.device)
    out = torch._scaled_mm(values, weight.t(), scale_a=one, scale_b=one,
                           out_dtype=torch.float32)
    return (out * scale).mul_(weight_scale).to(dtype)


def candidates() -> dict[str, Matmul]:
    """The FP8 matmuls to time, the reference first."""
    from kernels.fp8_matmul import TILES, fp8_matmul
    return {"scaled_mm": scaled_mm_rowwise, "cublas": cublas_unit_scaled,
            **{f"triton_{n}x{k}": functools.partial(fp8_matmul, block_n=n, block_k=k)
               for n, k in TILES}}


def seconds_per_call(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Best of three timed runs of `calls` calls, after a warm-up call (which compiles and
    allocates). On CUDA the calls are replayed from a CUDA graph, as the engine runs them: the
    device's time, without the host's launch costs."""
    fn()
    runs = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            runs.append(start.elapsed_time(end) / 1000)
    else:
        for _ in range(3):
            began = time.perf_counter()
            for _ in range(calls):
                fn()
            runs.append(time.perf_counter() - began)
    return min(runs) / calls


@dataclass
class ShapeChoice:
    """For one weight shape: per row class, each candidate's microseconds per call (None where
    it failed or disagreed) and the one picked."""
    out_features: int
    in_features: int
    layers: int
    micros: dict[int, dict[str, float | None]] = field(default_factory=dict)
    picked: dict[int, str] = field(default_factory=dict)


def choose(layers: list[Fp8Linear], matmuls: dict[str, Matmul], dtype: torch.dtype,
           row_classes: tuple[int, ...] = ROW_CLASSES) -> list[ShapeChoice]:
    """Times `matmuls` (the first is the reference) on each shape of `layers` and sets each
    layer's `matmuls` to the fastest that agree; returns what it measured."""
    by_shape: dict[tuple[int, int], list[Fp8Linear]] = {}
    for layer in layers:
        by_shape.setdefault((layer.out_features, layer.in_features), []).append(layer)
    reference = next(iter(matmuls.values()))
    choices = []
    for (out_features, in_features), group in by_shape.items():
        choice = ShapeChoice(out_features, in_features, len(group))
        device = group[0].weight.device
        for rows in row_classes:
            x = torch.randn(rows, in_features, dtype=dtype, device=device)
            values, scale = quantize_rows(x)
            expected = reference(values, scale, group[0].weight, group[0].weight_scale, dtype)
            tolerance = MATCH * expected.abs().max().item()
            times = {name: _micros(name, fn, group, values, scale, dtype, expected, tolerance)
                     for name, fn in matmuls.items()}
            measured = {name: t for name, t in times.items() if t is not None}
            choice.micros[rows] = times
            choice.picked[rows] = min(measured, key=measured.__getitem__) if measured else \
                next(iter(matmuls))
        for layer in group:
            layer.matmuls = [(rows, matmuls[choice.picked[rows]]) for rows in row_classes]
        choices.append(choice)
    return choices


def _micros(name: str, fn: Matmul, group: list[Fp8Linear], values: torch.Tensor,
            scale: torch.Tensor, dtype: torch.dtype, expected: torch.Tensor,
            tolerance: float) -> float | None:
    """Microseconds per call over the group's layers in turn; None if it fails or disagrees."""
    first = group[0]
    try:
        out = fn(values, scale, first.weight, first.weight_scale, dtype)
        if out.shape != expected.shape or \
                not (out.float() - expected.float()).abs().max().item() <= tolerance:
            log.warning("fp8 matmul %s disagrees with _scaled_mm on %d rows of %s: not used",
                        name, values.shape[0], tuple(first.weight.shape))
            return None
        layers = itertools.cycle(group)

        def call() -> None:
            layer = next(layers)
            fn(values, scale, layer.weight, layer.weight_scale, dtype)
        return 1e6 * seconds_per_call(call, first.weight.device, calls=max(8, len(group)))
    except Exception as error:  # noqa: BLE001 - a kernel this device cannot build, run or capture
        log.warning("fp8 matmul %s failed on %d rows of %s (%s): not used", name,
                    values.shape[0], tuple(first.weight.shape), error)
        return None


def choose_matmuls(model: nn.Module, dtype: torch.dtype) -> list[ShapeChoice]:
    """Picks the FP8 matmuls of a model's Fp8Linear layers that run on FP8 tensor cores."""
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear) and m.matmuls]
    if not layers:
        return []
    with torch.inference_mode():
        choices = choose(layers, candidates(), dtype)
    torch.cuda.empty_cache()  # the timing graphs' memory, before the KV cache is sized
    for choice in choices:
        log.info("fp8 matmul for %dx%d: %s", choice.out_features, choice.in_features,
                 ", ".join(f"<={rows} rows {name}" for rows, name in choice.picked.items()))
    return choices
