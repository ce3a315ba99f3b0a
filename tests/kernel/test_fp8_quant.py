"""The one-kernel FP8 row quantization gives the engine's PyTorch quantization, bit for bit."""
from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE

from kernels.fp8_quant import quantize_rows
from workers.engine import fp8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [64, 576, 1000])
def test_matches_the_engine_quantization(dtype, width):
    torch.manual_seed(width)
    # rows of very different magnitudes, a row of zeros and one with a single non-zero
    x = torch.randn(6, width) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 0.0, 1.0])[:, None]
    x[5, 1:] = 0
    x = x.to(dtype=dtype, device=DEVICE)
    values, scale = quantize_rows(x)
    expected, expected_scale = fp8.quantize_rows(x)
    assert values.dtype == fp8.FP8 and scale.shape == (6, 1)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(values.view(torch.uint8), expected.view(torch.uint8))


def test_strided_rows_and_no_rows():
    x = torch.randn(4, 256, device=DEVICE)[:, :96]
    values, scale = quantize_rows(x)
    expected, expected_scale = fp8.quantize_rows(x)
    assert torch.equal(values.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(scale, expected_scale)
    values, scale = quantize_rows(torch.empty(0, 96, device=DEVICE))
    assert values.shape == (0, 96) and scale.shape == (0, 1)


def test_ties_subnormals_and_signed_zeros():
    x = torch.tensor([[448.0, 17.0, 19.0, -17.0, -0.0, 2.0**-10, 3 * 2.0**-10, -3 * 2.0**-10,
                       0.0146, 0.0157, 124.3, -447.0]], device=DEVICE)
    values, _ = quantize_rows(x)
    expected, _ = fp8.quantize_rows(x)
    assert torch.equal(values.view(torch.uint8), expected.view(torch.uint8))


def test_wide_rows_of_many_magnitudes():
    torch.manual_seed(1)
    x = torch.randn(16, 4096) * torch.logspace(-4, 4, 16)[:, None]
    x = x.to(dtype=torch.bfloat16, device=DEVICE)
    values, scale = quantize_rows(x)
    expected, expected_scale = fp8.quantize_rows(x)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(values.view(torch.uint8), expected.view(torch.uint8))
