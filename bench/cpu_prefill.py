"""CPU prefill attention cases for bench/kernel_bench.py: the C++ kernel against the torch
backend's path (gather each sequence's K/V, then SDPA), on SmolLM2-135M's attention shapes:
single prompts, a prompt chunk after a cached prefix, and a mixed step of many prompts.
"""
from __future__ import annotations

import torch

from bench.cpu_attention import BLOCK, HEAD_DIM, HEADS, KV_HEADS, timed_ms
from kernels.reference import paged_prefill_ref
from workers.engine import cpu_attention
from workers.engine.attention import AttentionMetadata, TorchBackend

MIX = [16, 32, 64, 128, 256, 512] * 2  # the prompt lengths of bench/engine.py, twice
CASES = [("1 prompt of 128", [128], [128]), ("1 prompt of 512", [512], [512]),
         ("512-token chunk after 1,536 cached", [512], [2048]),
         ("12 prompts of 16-512", MIX, MIX)]


def prefill_step(query_lens: list[int], seq_lens: list[int], dtype: torch.dtype):
    """q, caches and metadata of one step of prefills, blocks scattered over the cache."""
    need = [-(-n // BLOCK) for n in seq_lens]
    shape = (sum(need), BLOCK, KV_HEADS, HEAD_DIM)
    k_cache, v_cache = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    perm, tables = torch.randperm(shape[0]).to(torch.int32), torch.zeros(len(need), max(need),
                                                                        dtype=torch.int32)
    for i, n in enumerate(need):
        tables[i, :n], perm = perm[:n], perm[n:]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
        query_start_loc_cpu=starts, query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
        max_query_len=max(query_lens), max_seq_len=max(seq_lens))
    return torch.randn(starts[-1], HEADS, HEAD_DIM, dtype=dtype), k_cache, v_cache, meta


def causal_flops(query_lens: list[int], seq_lens: list[int]) -> int:
    """QK and PV multiply-adds of the keys each query row sees, times two."""
    keys = sum(n * (s - n) + n * (n + 1) // 2 for n, s in zip(query_lens, seq_lens))
    return 4 * HEADS * HEAD_DIM * keys


def cpu_prefill_report() -> str:
    threads = torch.get_num_threads()
    lines = [(f"Prefill attention on the CPU ({threads} thread{'s' if threads > 1 else ''}), "
              f"SmolLM2-135M's heads ({HEADS} query, {KV_HEADS} KV, head_dim {HEAD_DIM}, block "
              f"{BLOCK}), causal. GFLOP/s counts only the keys each row sees. Median of repeated "
              "calls."), "",
             "| case | dtype | torch backend: gather + SDPA (ms) | C++ kernel (ms) | speed-up | "
             "kernel GFLOP/s |", "|---|---|---|---|---|---|"]
    if cpu_attention.load_prefill() is None:
        return "\n".join(lines[:1] + ["", "The C++ prefill kernel did not build here."])
    torch_backend, kernel = TorchBackend(), cpu_attention.CpuBackend()
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float32):
            for name, query_lens, seq_lens in CASES:
                q, k, v, meta = prefill_step(query_lens, seq_lens, dtype)
                ref = paged_prefill_ref(q, k, v, meta.query_start_loc, meta.seq_lens,
                                        meta.block_tables, HEAD_DIM ** -0.5)
                out = kernel.attention(q, k, v, meta, HEAD_DIM ** -0.5)
                torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
                args = (q, k, v, meta, HEAD_DIM ** -0.5)
                ms = [timed_ms(lambda b=b, a=args: b.attention(*a))
                      for b in (torch_backend, kernel)]
                lines.append(f"| {name} | {str(dtype).removeprefix('torch.')} | {ms[0]:.3f} | "
                             f"{ms[1]:.3f} | {ms[0] / ms[1]:.1f}x | "
                             f"{causal_flops(query_lens, seq_lens) / ms[1] / 1e6:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(cpu_prefill_report())
