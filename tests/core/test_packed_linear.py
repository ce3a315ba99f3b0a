"""PackedLinear computes what nn.Linear computes, on both of its paths (packed and plain)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.packed_linear import (
    PACKED_MAX_ROWS,
    PackedLinear,
    pack_linears,
    packing_supported,
)

pytestmark = pytest.mark.skipif(not packing_supported(torch.device("cpu"), torch.float32),
                                reason="this torch build has no oneDNN")


BF16 = pytest.mark.skipif(not packing_supported(torch.device("cpu"), torch.bfloat16),
                          reason="this CPU or torch build has no oneDNN bf16")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=BF16)])
@pytest.mark.parametrize("rows", [0, 1, 7, 64, PACKED_MAX_ROWS + 1, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_linear(rows, bias, dtype):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 160, bias=bias).to(dtype)
    x = torch.randn(rows, 96, dtype=dtype)
    with torch.inference_mode():
        out = PackedLinear(linear.weight, linear.bias)(x)
        # the float32 product of the same bf16 inputs: only the output rounding may differ
        expected = F.linear(x.float(), linear.weight.float(),
                            None if bias is False else linear.bias.float())
    assert out.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


def test_pack_linears_replaces_every_linear_and_keeps_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Sequential(nn.Linear(64, 8)))
    x = torch.randn(5, 32)
    with torch.inference_mode():
        expected = model(x)
        pack_linears(model)
        assert not any(isinstance(m, nn.Linear) for m in model.modules())
        assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 2
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
