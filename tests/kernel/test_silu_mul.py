"""SiLU-and-mul."""
from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, tolerance

from kernels.reference import silu_mul_ref
from kernels.silu_mul import silu_mul


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,block", [(64, 1024), (1536, 1024), (100, 32)])
def test_silu_mul_matches_reference(d, block, dtype):
    x = torch.randn(5, 2 * d, dtype=dtype, device=DEVICE) * 4
    torch.testing.assert_close(silu_mul(x, block=block), silu_mul_ref(x), **tolerance(dtype))


def test_silu_mul_keeps_leading_dims():
    x = torch.randn(2, 3, 128, device=DEVICE)
    out = silu_mul(x)
    assert out.shape == (2, 3, 64)
    torch.testing.assert_close(out, silu_mul_ref(x), **tolerance(torch.float32))


def test_silu_mul_rejects_odd_width():
    with pytest.raises(ValueError, match="even"):
        silu_mul(torch.randn(2, 7, device=DEVICE))
