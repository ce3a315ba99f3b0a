"""FP8 (E4M3) quantization: the math against an independent reference, the quantized linear
against the float one, and the engine option's validation."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.attention import TorchBackend
from workers.engine.config import EngineConfig
from workers.engine.fp8 import (
    FP8,
    Fp8Linear,
    QuantizedRows,
    dequantize,
    quantize_linears,
    quantize_rows,
    scaled_mm_rowwise,
)
from workers.engine.model import CausalLM, ModelConfig


def e4m3_grid() -> torch.Tensor:
    """Every finite E4M3 value, built from its definition (1 sign, 4 exponent bits with bias 7,
    3 mantissa bits, no infinities, S.1111.111 is NaN), in float64 and sorted."""
    values = set()
    for exponent, mantissa in itertools.product(range(16), range(8)):
        if exponent == 15 and mantissa == 7:
            continue
        if exponent == 0:
            magnitude = mantissa / 8 * 2.0**-6
        else:
            magnitude = (1 + mantissa / 8) * 2.0 ** (exponent - 7)
        values |= {magnitude, -magnitude}
    return torch.tensor(sorted(values), dtype=torch.float64)


def reference_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row scale amax times fp32(1 / 448) (CUDA's division by a scalar), then round to the
    nearest grid value, ties to the even mantissa."""
    grid = e4m3_grid()
    amax = x.double().abs().amax(dim=-1, keepdim=True)
    scale = amax.clamp(min=1e-12).float() * torch.tensor(1 / 448, dtype=torch.float32)
    y = (x.float() / scale).double().clamp(-448, 448)
    distance = (y[..., None] - grid).abs()
    best = distance.min(dim=-1, keepdim=True).values
    candidates = (distance == best)
    # a tie sits between two neighbours: the one whose mantissa's last bit is 0
    even = torch.tensor([float(v) in EVEN for v in grid.tolist()])
    pick = torch.where(candidates.sum(-1, keepdim=True) > 1, candidates & even, candidates)
    return grid[pick.float().argmax(dim=-1)], scale


def even_mantissas() -> set[float]:
    out = set()
    for exponent, mantissa in itertools.product(range(16), range(0, 8, 2)):
        magnitude = mantissa / 8 * 2.0**-6 if exponent == 0 else \
            (1 + mantissa / 8) * 2.0 ** (exponent - 7)
        out |= {magnitude, -magnitude}
    return out


EVEN = even_mantissas()


def test_grid_is_e4m3():
    grid = e4m3_grid()
    assert len(grid) == 253  # 256 codes less two NaNs, and +0/-0 are one value
    assert grid.max() == 448 and grid[grid > 0].min() == 2.0**-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_matches_reference(dtype):
    torch.manual_seed(0)
    # rows of very different magnitudes, a row of zeros and one with a single non-zero
    x = torch.randn(6, 64) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 0.0, 1.0])[:, None]
    x[5, 1:] = 0
    x = x.to(dtype)
    values, scale = quantize_rows(x)
    expected, expected_scale = reference_quantize(x)
    assert values.dtype == FP8 and scale.shape == (6, 1)
    torch.testing.assert_close(scale, expected_scale, rtol=0, atol=0)
    assert torch.equal(values.double(), expected)


def test_ties_round_to_even_and_saturate_at_448():
    # scale 1 (the row's largest value is 448): 17 lies between 16 and 18, 19 between 18 and 20
    x = torch.tensor([[448.0, 17.0, 19.0, -17.0, 0.0, 2.0**-10, 3 * 2.0**-10]])
    values, scale = quantize_rows(x)
    assert scale.item() == 1.0
    assert values.float().tolist() == [[448.0, 16.0, 20.0, -16.0, 0.0, 0.0, 2.0**-8]]
    # values past the largest row maximum cannot occur, and rounding up past 448 is clamped
    big = torch.tensor([[1e30, -1e30, 5e29]])
    values, _ = quantize_rows(big)
    assert values.float().tolist() == [[448.0, -448.0, 224.0]]
    assert torch.isfinite(values.float()).all()


def test_zero_rows_quantize_to_zero():
    values, scale = quantize_rows(torch.zeros(3, 32))
    assert (values.float() == 0).all() and (scale > 0).all()
    assert (dequantize(values, scale) == 0).all()


def test_dequantize_error_is_within_half_an_e4m3_step():
    torch.manual_seed(1)
    x = torch.randn(64, 256)
    values, scale = quantize_rows(x)
    error = (dequantize(values, scale) - x).abs()
    # 3 mantissa bits: at most 2^-4 relative, below 2^-6 * scale the subnormal step 2^-10
    bound = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10)
    assert (error <= bound * (1 + 1e-6)).all()


def linear_pair(bias: bool, seed: int = 0) -> tuple[nn.Linear, Fp8Linear]:
    torch.manual_seed(seed)
    linear = nn.Linear(256, 96, bias=bias)
    return linear, Fp8Linear(linear.weight, linear.bias)


def cpu_rowwise_scaled_mm() -> bool:
    """torch 2.13's CPU `_scaled_mm` takes row-wise scales; 2.11's per-tensor scales only."""
    try:
        torch._scaled_mm(torch.zeros(1, 16, dtype=FP8), torch.zeros(16, 16, dtype=FP8).t(),
                         scale_a=torch.ones(1, 1), scale_b=torch.ones(1, 16),
                         out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


ROWWISE = pytest.mark.skipif(not cpu_rowwise_scaled_mm(),
                             reason="this torch's CPU _scaled_mm takes per-tensor scales only")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scaled_mm", [False, pytest.param(True, marks=ROWWISE)])
def test_fp8_linear_computes_the_quantized_product(bias, scaled_mm):
    """Both paths (CPU's `_scaled_mm` reference kernel, the one CUDA runs, and the dequantized
    matmul) give the product of the quantized activations and weights."""
    linear, fp8 = linear_pair(bias)
    fp8.matmuls = [(0, scaled_mm_rowwise)] if scaled_mm else []
    x = torch.randn(3, 5, 256)
    with torch.inference_mode():
        out = fp8(x)
        xv, xs = quantize_rows(x.reshape(-1, 256))
        weight = dequantize(fp8.weight, fp8.weight_scale.t())
        exact = dequantize(xv, xs).double() @ weight.double().t()
        if bias:
            exact += linear.bias.double()
    assert out.shape == (3, 5, 96) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact.reshape(3, 5, 96), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_is_close_to_the_float_linear(dtype):
    """Relative RMS error below 6%: each E4M3 factor is off by at most 2^-4 (about 2.5% RMS for
    Gaussian data), two of them multiply, and bf16 outputs add 2^-8 of rounding."""
    torch.manual_seed(2)
    linear = nn.Linear(256, 96).to(dtype)
    fp8 = Fp8Linear(linear.weight, linear.bias)
    x = torch.randn(64, 256, dtype=dtype)
    with torch.inference_mode():
        expected = F.linear(x.float(), linear.weight.float(), linear.bias.float())
        out = fp8(x).float()
    assert fp8(x).dtype == dtype
    error = (out - expected).norm() / expected.norm()
    assert error < 0.06, f"relative error {error:.4f}"
    assert fp8.weight.dtype == FP8 and fp8.weight.element_size() == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_quantizes_like_the_cpu_and_multiplies_the_quantized_values():
    """On Hopper this is `_scaled_mm` on FP8 tensor cores, writing bf16."""
    torch.manual_seed(3)
    x = torch.randn(7, 256) * torch.logspace(-3, 3, 7)[:, None]
    cpu_values, cpu_scale = quantize_rows(x)
    values, scale = quantize_rows(x.cuda())
    assert torch.equal(values.cpu().view(torch.uint8), cpu_values.view(torch.uint8))
    assert torch.equal(scale.cpu(), cpu_scale)
    linear = nn.Linear(256, 96).to("cuda", torch.bfloat16)
    fp8 = Fp8Linear(linear.weight, linear.bias)
    assert bool(fp8.matmuls) == (torch.cuda.get_device_capability() >= (9, 0))
    xb = x.to("cuda", torch.bfloat16)
    with torch.inference_mode():
        out = fp8(xb)
    xv, xs = quantize_rows(xb)
    weight = dequantize(fp8.weight, fp8.weight_scale.t()).double()
    exact = dequantize(xv, xs).double() @ weight.t() + linear.bias.double()
    assert out.dtype == torch.bfloat16
    atol = 1e-2 * exact.abs().max().item()
    torch.testing.assert_close(out.double(), exact, rtol=1e-2, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled_mm", [False, pytest.param(True, marks=ROWWISE)])
def test_fp8_linear_takes_rows_already_quantized(dtype, scaled_mm):
    """The quantized rows a fused kernel hands over give what the plain rows give."""
    _, fp8 = linear_pair(bias=True)
    fp8.matmuls = [(0, scaled_mm_rowwise)] if scaled_mm else []
    x = torch.randn(3, 5, 256, dtype=dtype)
    values, scale = quantize_rows(x.reshape(-1, 256))
    rows = QuantizedRows(values.view(3, 5, 256), scale.view(3, 5, 1), dtype)
    with torch.inference_mode():
        out = fp8(rows)
        assert out.shape == (3, 5, 96) and out.dtype == dtype
        assert torch.equal(out, fp8(x))


class FusingBackend(TorchBackend):
    """Offers quantized outputs as TritonBackend does (its kernels: tests/kernel)."""

    def rms_norm_fp8(self, *args):
        raise NotImplementedError

    def silu_mul_fp8(self, *args):
        raise NotImplementedError


def test_only_fp8_linears_after_a_fusing_backend_take_quantized_inputs():
    cfg = ModelConfig.from_hf({"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 2, "num_attention_heads": 4})
    for backend, fused in ((TorchBackend(), 0), (FusingBackend(), 6)):
        model = CausalLM(cfg, backend)
        assert model.fuse_fp8_inputs() == 0  # float linears quantize nothing
        quantize_linears(model)
        assert model.fuse_fp8_inputs() == fused
        layer = model.layers["0"]
        assert layer.fp8_inputs == layer.mlp.fp8_input == bool(fused)
        assert model.fuse_fp8_inputs(enabled=False) == 0


def test_empty_batch():
    _, fp8 = linear_pair(bias=True)
    for scaled_mm in (False, True):
        fp8.matmuls = [(0, scaled_mm_rowwise)] if scaled_mm else []
        assert fp8(torch.randn(0, 256)).shape == (0, 96)


def test_quantize_linears_replaces_the_projections_only():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv_proj, self.o_proj = nn.Linear(32, 48), nn.Linear(16, 32, bias=False)
            self.gate_up_proj, self.down_proj = nn.Linear(32, 64), nn.Linear(32, 32)
            self.lm_head = nn.Linear(32, 100, bias=False)

    block = Block()
    assert quantize_linears(block) == 4
    assert isinstance(block.lm_head, nn.Linear)
    assert all(isinstance(getattr(block, n), Fp8Linear)
               for n in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))


@pytest.mark.parametrize("kwargs", [{"quantization": "int4"}, {"gpu_memory_utilization": 0},
                                    {"gpu_memory_utilization": 1.5},
                                    {"kv_cache_memory_gb": -1.0}])
def test_config_rejects(model_dir, kwargs):
    with pytest.raises(ValueError):
        EngineConfig(model=model_dir, **kwargs)


def test_config_accepts_fp8_and_none(model_dir):
    assert EngineConfig(model=model_dir, quantization="fp8").quantization == "fp8"
    assert EngineConfig(model=model_dir, quantization="none").quantization is None
    assert EngineConfig(model=model_dir).quantization is None
