"""PackedLinear computes what nn.Linear computes, on both of its paths (packed and plain)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from workers.engine.packed_linear import (
    PACKED_MAX_ROWS,
    PackedLinear,
    pack_linears,
    packing_supported,
)

pytestmark = pytest.mark.skipif(not packing_supported(torch.device("cpu"), torch.float32),
                                reason="this torch build has no oneDNN")


@pytest.mark.parametrize("rows", [0, 1, 7, 64, PACKED_MAX_ROWS + 1, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_linear(rows, bias):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 160, bias=bias)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear.weight, linear.bias)(x), linear(x),
                                   rtol=1e-5, atol=1e-5)


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
