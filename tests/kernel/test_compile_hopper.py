"""Every Triton kernel the engine launches compiles for Hopper (sm_90), on a machine without a
GPU: Triton's front end and its bundled ptxas reject code the interpreter runs happily (a
non-constexpr global, say), and a GPU is rarely at hand.

A subprocess runs the real engine (Triton backend, bf16, then with FP8 weights, then with an
FP8 KV cache) with Triton's launch replaced by a compile for an H100/H200 target: the kernels
and specializations a GPU run would build. A kernel's variants that write E4M3 rows or read or
write an E4M3 cache are listed apart."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kernels.fp8_matmul import TILES

HOPPER_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90
COMPILE_ONLY = """
import os, re, sys
import torch
import triton
import triton.runtime.jit as jit
from triton.backends.compiler import GPUTarget

class Hopper:  # the active driver, as far as compiling needs one
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0

triton.runtime.driver.set_active(Hopper())
compiled = set()
shared, matmul_wgmma = [], []
run = jit.JITFunction.run

def compile_only(self, *args, grid, warmup, **kwargs):
    fp8_kv = any("cache_ptr" in name and getattr(a, "dtype", None) == torch.float8_e4m3fn
                 for name, a in zip(self.arg_names, args))
    compiled.add(self.__name__ + ("(FP8_OUT)" if kwargs.get("FP8_OUT") else "")
                 + ("(FP8_KV)" if fp8_kv else ""))
    kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
    shared.append(kernel.metadata.shared)
    if self.__name__ == "_fp8_matmul_kernel":
        ptx = kernel.asm["ptx"]
        # each thread's share of the tile is added into fp32 once per 128 products of K
        promotions = (kwargs["BLOCK_M"] * kwargs["BLOCK_N"] // (32 * kwargs["num_warps"])
                      * kwargs["BLOCK_K"] // 128)
        adds = len(re.findall(r"\\badd(\\.rn)?\\.f32\\b", ptx))
        matmul_wgmma.append("wgmma" in ptx and adds >= promotions)
    return kernel

jit.JITFunction.run = compile_only
import kernels.fp8_matmul
import kernels.fp8_quant
import workers.engine.triton_backend  # decorated for the compiler: no interpreter yet
os.environ["TRITON_INTERPRET"] = "1"  # lets the launchers take CPU tensors
from workers.engine.config import EngineConfig
from workers.engine.llm_engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

for quantization, kv in ((None, "auto"), ("fp8", "auto"), (None, "fp8")):
    engine = LLMEngine(EngineConfig(model=sys.argv[1], device="cpu", dtype="bfloat16",
                                    attention_backend="triton", num_kv_blocks=64,
                                    quantization=quantization, kv_cache_dtype=kv))
    engine.add_request("a", list(range(100, 140)), SamplingParams(max_tokens=3, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
kernels.fp8_quant.quantize_rows(torch.randn(8, 576, dtype=torch.bfloat16))
# the FP8 matmul the engine may pick on Hopper: every tile, for decode and prefill row counts
a, a_scale = kernels.fp8_quant.quantize_rows(torch.randn(200, 512))
b, b_scale = kernels.fp8_quant.quantize_rows(torch.randn(256, 512))
for rows in (16, 200):
    for block_n, block_k in kernels.fp8_matmul.TILES:
        kernels.fp8_matmul.fp8_matmul(a[:rows], a_scale[:rows], b, b_scale,
                                      block_n=block_n, block_k=block_k)
print(" ".join(sorted(compiled)))
print(max(shared), len(matmul_wgmma), all(matmul_wgmma))
"""


@pytest.mark.slow
def test_the_engines_kernels_compile_for_sm90(model_dir):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", COMPILE_ONLY, os.path.abspath(model_dir)],
                          cwd=root, env={**env, "PYTHONPATH": root}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    names, sizes = done.stdout.splitlines()[-2:]
    assert names.split() == sorted([
        "_fp8_matmul_kernel", "_paged_decode_kernel", "_paged_prefill_kernel",
        "_quantize_rows_kernel", "_rms_norm_kernel", "_rms_norm_kernel(FP8_OUT)",
        "_rope_write_kv_kernel", "_silu_mul_kernel", "_silu_mul_kernel(FP8_OUT)",
        "_paged_decode_kernel(FP8_KV)", "_paged_prefill_kernel(FP8_KV)",
        "_rope_write_kv_kernel(FP8_KV)"])
    most_shared, matmuls, wgmma = sizes.split()
    assert int(most_shared) <= HOPPER_SHARED_BYTES  # else the launch fails on the GPU
    # every FP8 matmul variant runs on Hopper's warpgroup tensor-core instructions and promotes
    # their reduced-precision sums into fp32 (without it: no add per 128 products)
    assert int(matmuls) == 2 * len(TILES) and wgmma == "True"
