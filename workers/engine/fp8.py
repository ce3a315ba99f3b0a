"""FP8 (E4M3) weights: per-output-channel weight scales, dynamic per-token activation scales.

    quantize_linears(model)   # after the weights are loaded, on every rank's own shard

Each linear layer's weight row is divided by amax(row) / 448 and rounded to E4M3 (round to
nearest even, saturating at +-448); at run time each input row gets its own scale the same way
and `torch._scaled_mm` multiplies the two FP8 matrices, applying both scales to its fp32
accumulator: on Hopper, the FP8 tensor-core matmul (or one that computes the same product
faster for the layer's shape: `fp8_matmul_choice`). Elsewhere the same quantized values are
dequantized and multiplied in the compute dtype, so results agree across devices.
With the Triton backend (`CausalLM.fuse_fp8_inputs`) the RMSNorm and SiLU-mul kernels write the
inputs of qkv_proj, gate_up_proj and down_proj already quantized (`QuantizedRows`, the same
values); o_proj quantizes its own.
Under tensor parallelism each rank quantizes the rows or columns it holds: per-output-channel
scales of a column shard equal the unsplit model's, and a row-parallel shard's partial sums are
each rescaled before the all-reduce adds them.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_AMAX = 1e-12  # keeps the scale of an all-zero row positive
QUANTIZED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # embeddings and LM head stay

# (E4M3 rows [M, K], their scales [M, 1], E4M3 weight [N, K], its scales [1, N], output dtype)
Matmul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype],
                  torch.Tensor]


class QuantizedRows(NamedTuple):
    """Activation rows already quantized, by the kernel that computed them, for an Fp8Linear."""

    values: torch.Tensor  # E4M3, [..., in_features]
    scale: torch.Tensor  # fp32, [..., 1]
    dtype: torch.dtype  # of the rows before quantization: the linear's output dtype


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 values, fp32 scale per row [rows, 1]) with x ~= values * scale: each row's
    largest magnitude maps to 448. A row of zeros gets a tiny scale and quantizes to zeros."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_(min=MIN_AMAX)
    scale = amax * (1.0 / FP8_MAX)  # CUDA divides by a scalar this way: same scales on CPU
    # the division may round a row's largest value just past 448, which E4M3 cannot hold
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (values.float() * scale).to(dtype)


def scaled_mm_supported(device: torch.device, in_features: int, out_features: int) -> bool:
    """Whether this linear runs on FP8 tensor cores: `_scaled_mm` with row-wise scales needs
    Hopper (compute capability 9.0+) and inner sizes that are multiples of 16."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return not in_features % 16 and not out_features % 16 and \
        torch.cuda.get_device_capability(device) >= (9, 0)


def scaled_mm_rowwise(values: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor,
                      weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`torch._scaled_mm` with row-wise scales (a CUTLASS kernel on Hopper)."""
    # it writes bf16 on CUDA; other compute dtypes are cast after it
    out_dtype = torch.bfloat16 if values.is_cuda else dtype
    return torch._scaled_mm(values, weight.t(), scale_a=scale, scale_b=weight_scale,
                            out_dtype=out_dtype).to(dtype)


class Fp8Linear(nn.Module):
    """y = x @ W^T + b with W held in E4M3 and one fp32 scale per output channel.

    Its input is a tensor, whose rows it quantizes, or the QuantizedRows a fused kernel wrote.
    With FP8 tensor cores, `matmuls` says which FP8 matmul runs for how many rows: (at most this
    many rows, matmul) pairs by growing row count, the last one for any more rows. Without them
    (CPU, older GPUs) it multiplies the same quantized values, dequantized: the weight once,
    into `dequantized` (so on those devices fp8 checks the numerics and saves no memory), the
    activations per call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        values, scale = quantize_rows(weight.detach())
        self.weight = nn.Parameter(values, requires_grad=False)
        self.weight_scale = nn.Parameter(scale.view(1, -1), requires_grad=False)  # [1, out]
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        scaled_mm = scaled_mm_supported(weight.device, self.in_features, self.out_features)
        self.quantize_input = quantize_rows
        if scaled_mm:
            from kernels import fp8_quant  # one Triton kernel instead of about nine small ones
            if self.in_features <= fp8_quant.MAX_WIDTH:
                self.quantize_input = fp8_quant.quantize_rows
        self.matmuls: list[tuple[int, Matmul]] = [(0, scaled_mm_rowwise)] if scaled_mm else []
        self.dequantized: torch.Tensor | None = None

    def matmul(self, rows: int) -> Matmul:
        return next((fn for most, fn in self.matmuls if rows <= most), self.matmuls[-1][1])

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        if isinstance(x, QuantizedRows):
            shape, dtype = x.values.shape, x.dtype
            values, scale = x.values.reshape(-1, self.in_features), x.scale.reshape(-1, 1)
        else:
            shape, dtype = x.shape, x.dtype
            values, scale = self.quantize_input(x.reshape(-1, self.in_features))
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.matmuls and values.shape[0]:
            out = self.matmul(values.shape[0])(values, scale, self.weight, self.weight_scale,
                                               dtype)
            if bias is not None:
                out = out + bias
        else:
            if self.dequantized is None or self.dequantized.dtype != dtype:
                self.dequantized = dequantize(self.weight, self.weight_scale.t(), dtype)
            out = F.linear(dequantize(values, scale, dtype), self.dequantized, bias)
        return out.reshape(*shape[:-1], self.out_features)


def quantize_linears(model: nn.Module) -> int:
    """Replaces the decoder layers' projections by Fp8Linear; returns how many it replaced."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in QUANTIZED and isinstance(child, nn.Linear):
                setattr(module, name, Fp8Linear(child.weight, child.bias))
                count += 1
    return count
