"""Kernel benchmark: on a GPU, bandwidth and TFLOP/s of our kernels against the device's ceilings,
torch SDPA and vllm-flash-attn when installed; on CPU, the C++ decode attention against the
torch backend's gather + bmm (written to `## Kernels (CPU)`), and a small correctness sweep under
the Triton interpreter. Prints markdown tables; a GPU run also replaces `## Kernels`.

    python bench/kernel_bench.py           # GPU when present, else the CPU decode + sweep
    python bench/kernel_bench.py --write   # write the CPU sweep too (replaces the GPU numbers)
    python bench/kernel_bench.py --cpu-baseline main   # also time the CPU kernel at a git rev
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.cpu_attention import cpu_decode_report
from bench.cpu_prefill import cpu_prefill_report
from bench.kernel_cases import (
    DecodeCase,
    PrefillCase,
    bench_decode,
    bench_elementwise,
    bench_prefill,
    copy_bandwidth,
    correctness_sweep,
)
from bench.results import update_section


def gpu_report() -> str:
    import triton

    copy_gbs = copy_bandwidth()
    lines = [(f"triton {triton.__version__}. Device copy bandwidth "
              f"(bytes read + written, 2 GiB buffer): **{copy_gbs:.0f} GB/s**."), "",
             ("Decode: Llama-3.1-8B attention (32 q heads, 8 kv heads, head_dim 128, block 16, "
              "bf16), blocks scattered at random; bytes = K + V read once. The sweep rows are the "
              "fastest launch configs tried."),
             "", "| kernel | batch x context | config | time (us) | GB/s | % of copy BW |",
             "|---|---|---|---|---|---|"]
    lines += bench_decode(DecodeCase(), copy_gbs)
    # few sequences, long contexts: where split-K earns its keep
    lines += bench_decode(DecodeCase(batch=8, context=8192), copy_gbs, sweep_configs=False)
    lines += ["", "Prefill: same heads, causal; FLOPs = 4 * heads * head_dim * visible q-k pairs.",
              "", "| kernel | case | time (ms) | TFLOP/s |", "|---|---|---|---|"]
    for case in (PrefillCase(batch=4, new_tokens=2048, cached=0),
                 PrefillCase(batch=4, new_tokens=1024, cached=3072),
                 PrefillCase(batch=1, new_tokens=8192, cached=0)):
        lines += bench_prefill(case)
    lines += ["", "Fused layers (bf16, 4096 tokens, Llama-3.1-8B widths).", "",
              "| kernel | shape | time (us) | GB/s | % of copy BW |", "|---|---|---|---|---|"]
    lines += bench_elementwise(copy_gbs)
    return "\n".join(lines)


def cpu_report() -> str:
    lines = [("Correctness sweep under TRITON_INTERPRET=1 (no GPU): max abs error of each "
              "kernel against its PyTorch reference on random inputs."), "",
             "| kernel | case | dtype | max abs err | ok |", "|---|---|---|---|---|"]
    lines += correctness_sweep()
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true",
                        help="write the section even on CPU (GPU runs always write)")
    parser.add_argument("--cpu-baseline", metavar="REV",
                        help="also time the C++ CPU decode kernel as it was at this git revision")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu:
        decode = cpu_decode_report(args.cpu_baseline)
        print(decode + "\n", flush=True)
        prefill = cpu_prefill_report()
        print(prefill + "\n", flush=True)
        update_section("Kernels (CPU)", decode + "\n\n" + prefill)
    report = gpu_report() if gpu else cpu_report()
    print(report)
    if gpu or args.write:
        update_section("Kernels", report)
        print("\nupdated bench/RESULTS.md (## Kernels)")


if __name__ == "__main__":
    main()
