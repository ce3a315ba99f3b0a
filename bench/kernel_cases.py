"""Cases measured by bench/kernel_bench.py: each returns markdown table rows."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from kernels.kv_write import kv_write
from kernels.paged_decode import default_num_splits, paged_decode
from kernels.paged_prefill import paged_prefill
from kernels.reference import (
    kv_write_ref,
    paged_decode_ref,
    paged_prefill_ref,
    rms_norm_ref,
    rope_ref,
    silu_mul_ref,
)
from kernels.rms_norm import rms_norm
from kernels.rope import rope
from kernels.rope_cache import build_rope_cache
from kernels.rope_write_kv import rope_write_kv
from kernels.silu_mul import silu_mul
from workers.engine.attention import AttentionMetadata, TorchBackend


@dataclass(frozen=True)
class DecodeCase:
    batch: int = 64
    context: int = 2048
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16


@dataclass(frozen=True)
class PrefillCase:
    batch: int
    new_tokens: int
    cached: int
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16


def timed(fn) -> float:
    """Median milliseconds; do_bench flushes L2 between runs."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth() -> float:
    src = torch.empty(2**30, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def paged_cache(batch: int, seq_len: int, kv_heads: int, head_dim: int, block_size: int,
                dtype: torch.dtype, device: str = "cuda"):
    """K/V caches holding `batch` sequences of `seq_len` tokens in randomly scattered blocks."""
    per_seq = -(-seq_len // block_size)
    shape = (batch * per_seq, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=device)
    v_cache = torch.randn(shape, dtype=dtype, device=device)
    tables = torch.randperm(batch * per_seq, device=device).view(batch, per_seq).to(torch.int32)
    return k_cache, v_cache, tables


def flash_varlen():
    try:
        from vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def bench_decode(case: DecodeCase, copy_gbs: float, sweep_configs: bool = True) -> list[str]:
    k_cache, v_cache, tables = paged_cache(case.batch, case.context, case.kv_heads,
                                           case.head_dim, case.block_size, case.dtype)
    lens = torch.full((case.batch,), case.context, dtype=torch.int32, device="cuda")
    q = torch.randn(case.batch, case.heads, case.head_dim, dtype=case.dtype, device="cuda")
    scale = case.head_dim ** -0.5
    kv_bytes = 2 * k_cache.numel() * k_cache.element_size()
    rows = []

    shape = f"{case.batch} x {case.context}"

    def row(name: str, config: str, ms: float) -> str:
        gbs = kv_bytes / ms / 1e6
        return (f"| {name} | {shape} | {config} | {ms * 1e3:.1f} | {gbs:.0f} | "
                f"{100 * gbs / copy_gbs:.0f}% |")

    ref = paged_decode_ref(q[:4], k_cache, v_cache, tables[:4], lens[:4], scale)
    sweep = []
    configs = [(n, w, s, k) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)
               for k in (1, 2)] if sweep_configs else []
    for block_n, num_warps, num_stages, splits in configs:
        kw = {"num_splits": splits, "block_n": block_n, "num_warps": num_warps,
              "num_stages": num_stages}
        try:
            out = paged_decode(q, k_cache, v_cache, tables, lens, scale,
                               case.context, **kw)
        except OutOfResources as e:  # a config the compiler cannot fit (shared memory)
            print(f"decode {kw} failed: {type(e).__name__}")
            continue
        torch.testing.assert_close(out[:4], ref, atol=3e-2, rtol=3e-2)
        ms = timed(lambda kw=kw: paged_decode(q, k_cache, v_cache, tables, lens,
                                              scale, case.context, **kw))
        sweep.append((ms, kw))
        print(f"decode {kw}: {ms * 1e3:.1f} us")
    default_ms = timed(lambda: paged_decode(q, k_cache, v_cache, tables, lens, scale,
                                            case.context))
    splits = default_num_splits(case.batch, case.kv_heads, case.context, q.device)
    rows.append(row("ours, paged (default)", f"splits={splits}", default_ms))
    if splits > 1:
        ms = timed(lambda: paged_decode(q, k_cache, v_cache, tables, lens, scale, case.context,
                                        num_splits=1))
        rows.append(row("ours, paged, no split-K", "splits=1", ms))
    for ms, kw in sorted(sweep, key=lambda item: item[0])[:3]:
        rows.append(row("ours, paged (sweep)", ", ".join(f"{k}={v}" for k, v in kw.items()),
                        ms))

    # dense contiguous K/V: the layout SDPA needs, without any paging cost
    k_dense = k_cache[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
    v_dense = v_cache[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
    ms = timed(lambda: F.scaled_dot_product_attention(q.unsqueeze(2), k_dense, v_dense,
                                                      scale=scale, enable_gqa=True))
    rows.append(row("torch SDPA, dense K/V", "enable_gqa", ms))
    meta = _decode_meta(tables, lens)
    ms = timed(lambda: TorchBackend().attention(q, k_cache, v_cache, meta, scale))
    rows.append(row("torch reference backend", "gather + SDPA", ms))
    flash = flash_varlen()
    if flash is not None:
        cu = torch.arange(case.batch + 1, dtype=torch.int32, device="cuda")
        ms = timed(lambda: flash(q=q, k=k_cache, v=v_cache, cu_seqlens_q=cu, max_seqlen_q=1,
                                 seqused_k=lens, max_seqlen_k=case.context, softmax_scale=scale,
                                 causal=True, block_table=tables))
        rows.append(row("vllm-flash-attn, paged", "varlen + block_table", ms))
    return rows


def _decode_meta(tables: torch.Tensor, lens: torch.Tensor) -> AttentionMetadata:
    n = lens.shape[0]
    return AttentionMetadata(
        slot_mapping=torch.zeros(n, dtype=torch.int64, device=lens.device),
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=lens.device),
        seq_lens=lens, block_tables=tables, query_start_loc_cpu=list(range(n + 1)),
        query_lens_cpu=[1] * n, seq_lens_cpu=lens.tolist(), max_query_len=1,
        max_seq_len=int(lens.max()))


def bench_prefill(case: PrefillCase) -> list[str]:
    seq_len = case.cached + case.new_tokens
    k_cache, v_cache, tables = paged_cache(case.batch, seq_len, case.kv_heads, case.head_dim,
                                           case.block_size, case.dtype)
    q = torch.randn(case.batch * case.new_tokens, case.heads, case.head_dim, dtype=case.dtype,
                    device="cuda")
    starts = torch.arange(case.batch + 1, dtype=torch.int32, device="cuda") * case.new_tokens
    lens = torch.full((case.batch,), seq_len, dtype=torch.int32, device="cuda")
    scale = case.head_dim ** -0.5
    pairs = case.new_tokens * case.cached + case.new_tokens * (case.new_tokens + 1) // 2
    flops = 4 * case.batch * case.heads * case.head_dim * pairs
    label = f"{case.batch} x {case.new_tokens} new" + (f" after {case.cached} cached"
                                                        if case.cached else "")
    rows = []

    def row(name: str, ms: float) -> str:
        return f"| {name} | {label} | {ms:.3f} | {flops / ms / 1e9:.0f} |"

    ref = paged_prefill_ref(q[:256], k_cache, v_cache, starts[:2].clamp(max=256),
                            lens[:1].clamp(max=case.cached + 256), tables[:1], scale)
    best = None
    for block_m, block_n, num_warps, num_stages in ((64, 64, 4, 2), (128, 64, 8, 2),
                                                    (128, 64, 8, 3), (128, 64, 4, 3),
                                                    (128, 128, 8, 2), (128, 32, 4, 3),
                                                    (128, 32, 8, 3), (64, 32, 4, 3)):
        kw = {"block_m": block_m, "block_n": block_n, "num_warps": num_warps,
              "num_stages": num_stages}
        try:
            out = paged_prefill(q[:256], k_cache, v_cache, starts[:2].clamp(max=256),
                                lens[:1].clamp(max=case.cached + 256), tables[:1], scale, 256,
                                **kw)
        except OutOfResources as e:
            print(f"prefill {kw} failed: {type(e).__name__}")
            continue
        torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)
        ms = timed(lambda kw=kw: paged_prefill(q, k_cache, v_cache, starts, lens, tables, scale,
                                               case.new_tokens, **kw))
        print(f"prefill {label} {kw}: {ms:.3f} ms")
        if best is None or ms < best[0]:
            best = (ms, kw)
    default_ms = timed(lambda: paged_prefill(q, k_cache, v_cache, starts, lens, tables, scale,
                                             case.new_tokens))
    rows.append(row("ours, paged (default)", default_ms))
    rows.append(row("ours, paged (best of sweep: " + ", ".join(f"{k}={v}" for k, v in
                                                               best[1].items()) + ")", best[0]))
    k_dense = k_cache[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
    v_dense = v_cache[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
    q_dense = q.view(case.batch, case.new_tokens, case.heads, -1).transpose(1, 2)
    if case.cached == 0:
        ms = timed(lambda: F.scaled_dot_product_attention(q_dense, k_dense, v_dense, scale=scale,
                                                          is_causal=True, enable_gqa=True))
        rows.append(row("torch SDPA, dense K/V, is_causal", ms))
    else:
        pos = torch.arange(case.cached, seq_len, device="cuda")
        mask = torch.arange(seq_len, device="cuda")[None, :] <= pos[:, None]
        ms = timed(lambda: F.scaled_dot_product_attention(q_dense, k_dense, v_dense, scale=scale,
                                                          attn_mask=mask, enable_gqa=True))
        rows.append(row("torch SDPA, dense K/V, bool mask", ms))
    flash = flash_varlen()
    if flash is not None:
        ms = timed(lambda: flash(q=q, k=k_cache, v=v_cache, cu_seqlens_q=starts,
                                 max_seqlen_q=case.new_tokens, seqused_k=lens,
                                 max_seqlen_k=seq_len, softmax_scale=scale, causal=True,
                                 block_table=tables))
        rows.append(row("vllm-flash-attn, paged", ms))
    return rows


def bench_elementwise(copy_gbs: float, tokens: int = 4096) -> list[str]:
    dt, kw = torch.bfloat16, {"dtype": torch.bfloat16, "device": "cuda"}
    x, res, w = (torch.randn(tokens, 4096, **kw), torch.randn(tokens, 4096, **kw),
                 torch.randn(4096, **kw))
    gate_up = torch.randn(tokens, 2 * 14336, **kw)
    q, k = torch.randn(tokens, 32, 128, **kw), torch.randn(tokens, 8, 128, **kw)
    cache = build_rope_cache(128, 8192, 500000.0, None, "cuda")
    positions = torch.randint(0, 8192, (tokens,), device="cuda")
    k_cache, v_cache, _ = paged_cache(tokens // 16, 16, 8, 128, 16, dt)
    slots = torch.randperm(tokens, device="cuda")
    size = 2  # bytes per bf16
    cases = [
        ("rms_norm + residual", f"{tokens} x 4096", lambda: rms_norm(x, w, 1e-5, res),
         4 * x.numel() * size),
        ("silu_mul", f"{tokens} x 2*14336", lambda: silu_mul(gate_up),
         1.5 * gate_up.numel() * size),
        ("rope", f"{tokens} x (32+8) x 128", lambda: rope(positions, q, k, cache),
         2 * (q.numel() + k.numel()) * size),
        ("kv_write", f"{tokens} x 8 x 128", lambda: kv_write(k, k, k_cache, v_cache, slots),
         4 * k.numel() * size),
        ("rope + kv_write (one kernel)", f"{tokens} x (32+8+8) x 128",
         lambda: rope_write_kv(positions, q, k, k, cache, k_cache, v_cache, slots),
         (2 * q.numel() + 4 * k.numel()) * size),
    ]
    rows = []
    for name, shape, fn, nbytes in cases:
        ms = timed(fn)
        gbs = nbytes / ms / 1e6
        rows.append(f"| {name} | {shape} | {ms * 1e3:.1f} | {gbs:.0f} | "
                    f"{100 * gbs / copy_gbs:.0f}% |")
    return rows


def correctness_sweep() -> list[str]:
    """Small shapes only: the interpreter runs every program in Python."""
    rows = []

    def add(name: str, case: str, dtype: torch.dtype, out, ref, tol: float) -> None:
        err = max((a.float() - b.float()).abs().max().item() for a, b in zip(out, ref))
        rows.append(f"| {name} | {case} | {str(dtype).removeprefix('torch.')} | {err:.2e} | "
                    f"{'yes' if err <= tol else 'NO'} |")

    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 1e-2)):
        for group, head_dim in ((1, 64), (3, 128), (8, 64)):
            k_cache, v_cache, tables = paged_cache(3, 70, 1, head_dim, 16, dtype, "cpu")
            lens = torch.tensor([1, 16, 70], dtype=torch.int32)
            q = torch.randn(3, group, head_dim, dtype=dtype)
            for splits in (1, 3):
                out = paged_decode(q, k_cache, v_cache, tables, lens, 0.1, 70, splits)
                add("paged_decode", f"gqa {group}, d {head_dim}, splits {splits}", dtype, [out],
                    [paged_decode_ref(q, k_cache, v_cache, tables, lens, 0.1)], tol)
            q = torch.randn(24, group, head_dim, dtype=dtype)
            starts = torch.tensor([0, 20, 24], dtype=torch.int32)
            lens2 = torch.tensor([20, 70], dtype=torch.int32)
            out = paged_prefill(q, k_cache, v_cache, starts, lens2, tables[:2], 0.1, 20,
                                block_m=16, block_n=32)
            add("paged_prefill", f"gqa {group}, d {head_dim}, prefix 0/66", dtype, [out],
                [paged_prefill_ref(q, k_cache, v_cache, starts, lens2, tables[:2], 0.1)], tol)
        x, r, w = torch.randn(5, 576, dtype=dtype), torch.randn(5, 576, dtype=dtype), \
            torch.randn(576, dtype=dtype)
        add("rms_norm", "5 x 576 + residual", dtype, rms_norm(x, w, 1e-5, r),
            rms_norm_ref(x, w, 1e-5, r), tol * 10)
        add("silu_mul", "5 x 2*1536", dtype, [silu_mul(torch.cat([x] * 6, -1))],
            [silu_mul_ref(torch.cat([x] * 6, -1))], tol * 10)
        qh, kh = torch.randn(5, 9, 64, dtype=dtype), torch.randn(5, 3, 64, dtype=dtype)
        cache = build_rope_cache(64, 100, 1e4, None)
        pos = torch.tensor([0, 1, 50, 98, 99])
        add("rope", "9/3 heads x 64", dtype, rope(pos, qh, kh, cache), rope_ref(pos, qh, kh, cache),
            tol * 10)
        k_cache, v_cache, _ = paged_cache(2, 16, 3, 64, 16, dtype, "cpu")
        caches = (k_cache.clone(), v_cache.clone())
        slots = torch.tensor([0, 17, 31, 5, -1])
        kv_write(qh[:, :3], kh, k_cache, v_cache, slots)
        kv_write_ref(qh[:, :3], kh, *caches, slots)
        add("kv_write", "5 tokens, 3 kv heads", dtype, [k_cache, v_cache], caches, 0.0)
    return rows
