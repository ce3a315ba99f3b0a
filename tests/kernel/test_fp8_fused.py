"""RMSNorm and SiLU-mul writing E4M3 rows give, bit for bit, what the unfused kernel followed by
`quantize_rows` gives."""
from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE

from kernels.fp8_quant import FP8, MAX_WIDTH, quantize_rows
from kernels.rms_norm import rms_norm, rms_norm_fp8
from kernels.silu_mul import silu_mul, silu_mul_fp8

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# rows from tiny to huge (powers of ten): finite in each dtype, and so is a product of two
MAGNITUDES = {torch.bfloat16: (-30, 15), torch.float16: (-5, 1.5), torch.float32: (-30, 15)}
# the interpreter's sigmoid of a large negative gate: exp overflows and the result is 0, as on a GPU
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def rows_of_many_magnitudes(rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian rows of many magnitudes, one row of zeros and one with a single value."""
    x = torch.randn(rows, width) * torch.logspace(*MAGNITUDES[dtype], rows)[:, None]
    if rows > 2:
        x[rows // 2] = 0
        x[1, 1:] = 0
    return x.to(dtype=dtype, device=DEVICE)


def assert_same_fp8(got: tuple[torch.Tensor, torch.Tensor],
                    expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    (values, scale), (expected_values, expected_scale) = got, expected
    assert values.dtype == FP8 and values.shape == expected_values.shape
    assert scale.dtype == torch.float32 and scale.shape == expected_scale.shape
    assert torch.equal(values.view(torch.uint8), expected_values.view(torch.uint8))
    assert torch.equal(scale, expected_scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 1536, 4100])
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp8_is_rms_norm_then_quantize(dtype, hidden, rows, with_residual):
    x = rows_of_many_magnitudes(rows, hidden, dtype)
    # weights of many magnitudes put small values of a row on E4M3's subnormal grid
    weight = (torch.randn(hidden) * torch.logspace(-3, 1, hidden)).to(dtype=dtype, device=DEVICE)
    residual = torch.randn_like(x) if with_residual else None
    values, scale, new_residual = rms_norm_fp8(x, weight, 1e-6, residual)
    normed, expected_residual = rms_norm(x, weight, 1e-6, residual)
    assert_same_fp8((values, scale), quantize_rows(normed))
    assert torch.equal(new_residual, expected_residual)
    if not with_residual:
        assert new_residual is x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 576, 1536, 4100, 14336])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_silu_mul_fp8_is_silu_mul_then_quantize(dtype, d, rows):
    x = torch.cat([rows_of_many_magnitudes(rows, d, dtype),
                   rows_of_many_magnitudes(rows, d, dtype)], dim=-1)
    assert_same_fp8(silu_mul_fp8(x), quantize_rows(silu_mul(x)))


def test_leading_dims_and_no_rows():
    x = torch.randn(2, 3, 128, device=DEVICE)
    values, scale, new_residual = rms_norm_fp8(x, torch.ones(128, device=DEVICE), 1e-6, x)
    assert values.shape == (2, 3, 128) and scale.shape == (2, 3, 1)
    assert new_residual.shape == (2, 3, 128)
    values, scale = silu_mul_fp8(x)
    assert values.shape == (2, 3, 64) and scale.shape == (2, 3, 1)
    assert_same_fp8((values.view(6, 64), scale.view(6, 1)), quantize_rows(silu_mul(x.view(6, 128))))
    empty = torch.empty(0, 128, device=DEVICE)
    assert rms_norm_fp8(empty, torch.ones(128, device=DEVICE), 1e-6)[1].shape == (0, 1)
    assert silu_mul_fp8(empty)[1].shape == (0, 1)


def test_silu_mul_fp8_rejects_rows_wider_than_one_program_holds():
    with pytest.raises(ValueError, match="wider"):
        silu_mul_fp8(torch.zeros(1, 2 * (MAX_WIDTH + 16), device=DEVICE))
