"""The Triton FP8 matmul gives the product of the quantized operands, rounded once; on a GPU
every FP8 matmul the engine may pick agrees with `torch._scaled_mm` inside a CUDA graph."""
from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE

from kernels.fp8_matmul import FP8, TILES, fp8_matmul, fp8_matmul_reference
from workers.engine import fp8, fp8_matmul_choice

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-16}


def operands(m: int, n: int, k: int) -> tuple[torch.Tensor, ...]:
    # activation rows of very different magnitudes, as after a norm or an activation
    x = torch.randn(m, k) * torch.logspace(-2, 2, max(m, 1))[:m, None]
    a, a_scale = fp8.quantize_rows(x.to(DEVICE))
    b, b_scale = fp8.quantize_rows(torch.randn(n, k, device=DEVICE) * 0.02)
    return a, a_scale, b, b_scale.view(1, -1)


def assert_rounded_once(out: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    """Within one unit in the last place of the output dtype, of each row's largest value:
    an fp32 sum may land across a rounding boundary from the exact one."""
    assert out.dtype == dtype
    row_max = exact.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
    error = (out.double() - exact).abs() / row_max
    assert error.max().item() <= ULP[dtype], error.max().item()


@pytest.mark.parametrize("block_n,block_k", TILES)
@pytest.mark.parametrize("m,n,k", [(1, 48, 64), (7, 200, 272), (64, 64, 128), (65, 130, 384),
                                   (130, 96, 96)])
def test_matches_the_exact_product(m, n, k, block_n, block_k):
    a, a_scale, b, b_scale = operands(m, n, k)
    out = fp8_matmul(a, a_scale, b, b_scale, torch.bfloat16, block_n, block_k)
    exact = fp8_matmul_reference(a, a_scale, b, b_scale, torch.float64)
    assert out.shape == (m, n)
    assert_rounded_once(out, exact, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_output_dtypes(dtype):
    a, a_scale, b, b_scale = operands(5, 80, 160)
    out = fp8_matmul(a, a_scale, b, b_scale, dtype, block_n=32)
    assert_rounded_once(out, fp8_matmul_reference(a, a_scale, b, b_scale, torch.float64), dtype)


def test_strided_rows_and_no_rows():
    a, a_scale, b, b_scale = operands(6, 64, 256)
    wide = torch.zeros(6, 384, dtype=FP8, device=DEVICE)
    wide[:, :256] = a
    out = fp8_matmul(wide[:, :256], a_scale, b, b_scale)
    assert torch.equal(out, fp8_matmul(a, a_scale, b, b_scale))
    empty = fp8_matmul(a[:0], a_scale[:0], b, b_scale)
    assert empty.shape == (0, 64)


@pytest.mark.parametrize("change,message", [
    ({"a": "float"}, "a dtype"), ({"b": "short"}, "columns"), ({"a_scale": "short"}, "scales"),
    ({"out_dtype": torch.int8}, "out_dtype"), ({"block_n": 48}, "block_n"),
    ({"block_n": 16, "block_k": 256}, "block_k"),
])
def test_rejects(change, message):
    a, a_scale, b, b_scale = operands(4, 32, 64)
    args = {"a": a, "a_scale": a_scale, "b": b, "b_scale": b_scale}
    if change.get("a") == "float":
        args["a"] = a.float()
    if change.get("b") == "short":
        args["b"] = b[:, :32]
    if change.get("a_scale") == "short":
        args["a_scale"] = a_scale[:2]
    kwargs = {k: v for k, v in change.items() if k in ("out_dtype", "block_n", "block_k")}
    with pytest.raises(ValueError, match=message):
        fp8_matmul(args["a"], args["a_scale"], args["b"], args["b_scale"], **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available() or
                    not fp8.scaled_mm_supported(torch.device("cuda"), 16, 16),
                    reason="needs FP8 tensor cores")
@pytest.mark.parametrize("rows", [1, 64, 300])
def test_every_candidate_agrees_with_scaled_mm_in_a_cuda_graph(rows):
    a, a_scale, b, b_scale = operands(rows, 2048, 4096)
    expected = fp8.scaled_mm_rowwise(a, a_scale, b, b_scale, torch.bfloat16)
    exact = fp8_matmul_reference(a, a_scale, b, b_scale, torch.float64)
    for name, matmul in fp8_matmul_choice.candidates().items():
        out = matmul(a, a_scale, b, b_scale, torch.bfloat16)
        assert_rounded_once(out, exact, torch.bfloat16)
        assert (out.float() - expected.float()).abs().max() <= \
            fp8_matmul_choice.MATCH * expected.abs().max(), name
        seconds = fp8_matmul_choice.seconds_per_call(
            lambda m=matmul: m(a, a_scale, b, b_scale, torch.bfloat16), a.device, calls=4)
        assert 0 < seconds < 0.1, name
