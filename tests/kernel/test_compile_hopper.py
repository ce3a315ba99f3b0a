"""Kernels compile for Hopper (sm_90) on a machine without a GPU: Triton's front end and its
bundled ptxas reject what the interpreter runs happily (a non-constexpr global, say)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import fp8_quant, rms_norm

def build(fn, signature, constexprs):
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}},
                    constexprs=constexprs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    return ptx

for x in ("*bf16", "*fp32"):
    ptx = build(fp8_quant._quantize_rows_kernel,
                {"x_ptr": x, "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "stride_x": "i32",
                 "stride_o": "i32"}, {"N": 4096, "BLOCK": 4096})
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "div.rn.f32" in ptx
    build(rms_norm._rms_norm_kernel,
          {"x_ptr": x, "residual_ptr": x, "weight_ptr": x, "out_ptr": x, "residual_out_ptr": x,
           "eps": "fp32", "num_rows": "i32", "stride_x": "i32", "stride_r": "i32",
           "stride_o": "i32", "stride_ro": "i32"},
          {"N": 2048, "BLOCK": 2048, "ROWS": 1, "HAS_RESIDUAL": True})
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    # the compiler, not the interpreter: a kernel is compiled only when Triton is not
    # interpreting, which it decides at import
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", COMPILE], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
