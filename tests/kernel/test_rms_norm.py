"""Fused residual add + RMSNorm."""
from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, tolerance

from kernels.reference import rms_norm_ref
from kernels.rms_norm import rms_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 576, 1000])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(hidden, dtype, with_residual):
    x = torch.randn(7, hidden, dtype=dtype, device=DEVICE) * 3
    weight = torch.randn(hidden, dtype=dtype, device=DEVICE)
    residual = torch.randn_like(x) if with_residual else None
    out, new_residual = rms_norm(x, weight, 1e-5, residual)
    ref, ref_residual = rms_norm_ref(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, ref, **tolerance(dtype))
    # one rounding of the sum either way (the interpreter's bf16 cast truncates, hence not equal)
    torch.testing.assert_close(new_residual, ref_residual, **tolerance(dtype))
    if not with_residual:
        assert new_residual is x


def test_rms_norm_keeps_leading_dims_and_inputs():
    x = torch.randn(2, 3, 64, device=DEVICE)
    residual = torch.randn_like(x)
    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = rms_norm(x, torch.ones(64, device=DEVICE), 1e-6, residual)
    assert out.shape == x.shape and new_residual.shape == x.shape
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_rms_norm_rejects_wrong_weight():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(2, 64, device=DEVICE), torch.ones(32, device=DEVICE), 1e-6)
