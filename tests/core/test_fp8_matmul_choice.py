"""The engine's pick of an FP8 matmul per weight shape and row class: only candidates that
agree with the reference and run are picked, the fastest of them, and a layer then runs its
pick for each row count. On CPU the candidates are PyTorch functions; the GPU's own
(`_scaled_mm`, cuBLAS, Triton) are checked in tests/kernel/test_fp8_matmul.py."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.fp8 import Fp8Linear, dequantize
from workers.engine.fp8_matmul_choice import choose


def dequantized(values, scale, weight, weight_scale, dtype):
    return F.linear(dequantize(values, scale, dtype), dequantize(weight, weight_scale.t(), dtype))


def slow(values, scale, weight, weight_scale, dtype):
    time.sleep(0.002)
    return dequantized(values, scale, weight, weight_scale, dtype)


def wrong(values, scale, weight, weight_scale, dtype):
    return dequantized(values, scale, weight, weight_scale, dtype) * 1.1


def broken(values, scale, weight, weight_scale, dtype):
    raise RuntimeError("no kernel for this device")


def layers() -> list[Fp8Linear]:
    torch.manual_seed(0)
    return [Fp8Linear(nn.Linear(64, 96, bias=False).weight) for _ in range(3)] + \
        [Fp8Linear(nn.Linear(96, 32, bias=False).weight)]


def test_picks_the_fastest_candidate_that_agrees_and_runs():
    group = layers()
    candidates = {"reference": slow, "wrong": wrong, "broken": broken, "fast": dequantized}
    with torch.inference_mode():
        choices = choose(group, candidates, torch.float32, row_classes=(4, 32))
    assert [(c.out_features, c.in_features, c.layers) for c in choices] == \
        [(96, 64, 3), (32, 96, 1)]
    for choice in choices:
        assert choice.picked == {4: "fast", 32: "fast"}
        for times in choice.micros.values():
            assert times["wrong"] is None and times["broken"] is None
            assert 0 < times["fast"] < times["reference"]
    for layer in group:
        assert [(rows, fn) for rows, fn in layer.matmuls] == [(4, dequantized), (32, dequantized)]


def test_the_reference_is_kept_when_nothing_else_works():
    group = layers()[:1]
    with torch.inference_mode():
        choice, = choose(group, {"reference": dequantized, "broken": broken}, torch.float32,
                         row_classes=(8,))
    assert choice.picked == {8: "reference"} and choice.micros[8]["broken"] is None


def test_a_layer_runs_the_pick_of_the_first_row_class_that_holds_its_rows():
    layer = layers()[0]
    calls = []

    def tagged(tag):
        def matmul(*args):
            calls.append(tag)
            return dequantized(*args)
        return matmul
    layer.matmuls = [(16, tagged("small")), (64, tagged("large"))]
    x = torch.randn(100, 64)
    with torch.inference_mode():
        for rows in (1, 16, 17, 64, 100):
            out = layer(x[:rows])
            assert torch.equal(out, F.linear(*quantized_operands(layer, x[:rows])))
    assert calls == ["small", "small", "large", "large", "large"]


def quantized_operands(layer: Fp8Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, scale = layer.quantize_input(x)
    return dequantize(values, scale), dequantize(layer.weight, layer.weight_scale.t())
