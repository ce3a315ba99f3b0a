"""The fused C++ CPU layer ops against the PyTorch references, the CPU backend's use of them,
and its fallback where they cannot build."""
from __future__ import annotations

import pytest
import torch

from kernels.reference import kv_write_ref, rms_norm_ref, rope_ref, silu_mul_ref
from kernels.rope_cache import build_rope_cache
from workers.engine import cpu_attention, cpu_layer_ops
from workers.engine.attention import TorchBackend
from workers.engine.cpu_attention import CpuBackend

needs_ops = pytest.mark.skipif(cpu_layer_ops.load() is None,
                               reason="the C++ layer ops did not build on this machine")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# one rounding step of the dtype: fp32 sums in another order, bf16/fp16 round the same values
TOLERANCE = {torch.float32: {"atol": 1e-5, "rtol": 1e-5},
             torch.float16: {"atol": 1e-3, "rtol": 1e-3},
             torch.bfloat16: {"atol": 8e-3, "rtol": 8e-3}}
TOKENS = [1, 7, 33, 301]  # a decode, odd counts, and enough rows to split over threads
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
CACHE_ROWS = 4096


def qkv_views(tokens: int, dtype: torch.dtype, head_dim: int = HEAD_DIM):
    """q, k, v as the model has them: strided views of one fused projection's output."""
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * head_dim).to(dtype)
    q, k, v = qkv.split([HEADS * head_dim, KV_HEADS * head_dim, KV_HEADS * head_dim], dim=-1)
    return (q.view(tokens, HEADS, head_dim), k.view(tokens, KV_HEADS, head_dim),
            v.view(tokens, KV_HEADS, head_dim))


def positions_for(tokens: int) -> torch.Tensor:
    """Positions across the whole cos/sin cache, its last row included."""
    positions = torch.randint(0, CACHE_ROWS, (tokens,))
    positions[-1] = CACHE_ROWS - 1
    return positions


@needs_ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", [576, 97, 4096, 5])
def test_rms_norm_with_residual_matches_reference(dtype, tokens, hidden):
    x, residual = torch.randn(tokens, hidden).to(dtype), (3 * torch.randn(tokens, hidden)).to(dtype)
    weight = (1 + torch.randn(hidden) / 4).to(dtype)
    normed, new_residual = cpu_layer_ops.rms_norm(x, weight, 1e-5, residual)
    ref_normed, ref_residual = rms_norm_ref(x, weight, 1e-5, residual)
    assert normed.dtype == dtype and normed.shape == x.shape
    assert torch.equal(new_residual, ref_residual)  # the sum rounds exactly as torch rounds it
    assert torch.equal(normed, ref_normed)  # and the statistics add up in torch's order


@needs_ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_rms_norm_without_residual_returns_x_as_residual(dtype, tokens):
    x, weight = (5 * torch.randn(tokens, 576)).to(dtype), torch.randn(576).to(dtype)
    normed, residual = cpu_layer_ops.rms_norm(x, weight, 1e-6)
    ref_normed, _ = rms_norm_ref(x, weight, 1e-6)
    assert torch.equal(residual, x)
    assert torch.equal(normed, ref_normed)


@needs_ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_rope_matches_reference_exactly(dtype, tokens):
    cache = build_rope_cache(HEAD_DIM, CACHE_ROWS, 10000.0, None)
    q, k, _ = qkv_views(tokens, dtype)
    positions = positions_for(tokens)
    out_q, out_k = cpu_layer_ops.rope(positions, q, k, cache)
    ref_q, ref_k = rope_ref(positions, q, k, cache)
    assert out_q.is_contiguous() and out_q.dtype == dtype
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)


def cache_and_slots(tokens: int, dtype: torch.dtype, skip: int | None = None):
    """Caches of random content and distinct random slots; `skip` marks a token slot -1."""
    block_size, blocks = 16, tokens // 16 + 8
    shape = (blocks, block_size, KV_HEADS, HEAD_DIM)
    k_cache, v_cache = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    slots = torch.randperm(blocks * block_size)[:tokens]
    if skip is not None:
        slots[skip] = -1
    return k_cache, v_cache, slots


@needs_ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_rope_write_kv_matches_rope_then_cache_write(dtype, tokens):
    cache = build_rope_cache(HEAD_DIM, CACHE_ROWS, 500000.0, None)
    q, k, v = qkv_views(tokens, dtype)
    positions = positions_for(tokens)
    k_cache, v_cache, slots = cache_and_slots(tokens, dtype, skip=tokens // 2)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    out_q = cpu_layer_ops.rope_write_kv(positions, q, k, v, cache, k_cache, v_cache, slots)
    ref_q, ref_k = rope_ref(positions, q, k, cache)
    kv_write_ref(ref_k, v, ref_k_cache, ref_v_cache, slots)
    assert torch.equal(out_q, ref_q)
    assert torch.equal(k_cache, ref_k_cache) and torch.equal(v_cache, ref_v_cache)


@needs_ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_write_kv_matches_reference(dtype, tokens):
    _, k, v = qkv_views(tokens, dtype)
    k_cache, v_cache, slots = cache_and_slots(tokens, dtype, skip=0)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    cpu_layer_ops.write_kv(k, v, k_cache, v_cache, slots)
    kv_write_ref(k, v, ref_k_cache, ref_v_cache, slots)
    assert torch.equal(k_cache, ref_k_cache) and torch.equal(v_cache, ref_v_cache)


@needs_ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_silu_mul_matches_reference(dtype, tokens):
    x = (4 * torch.randn(tokens, 2 * 1536)).to(dtype)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # saturated and zero gates
    out = cpu_layer_ops.silu_mul(x)
    assert out.shape == (tokens, 1536) and out.dtype == dtype
    torch.testing.assert_close(out, silu_mul_ref(x), **TOLERANCE[dtype])


@needs_ops
def test_rejects_out_of_range_indices_and_mismatched_inputs():
    cache = build_rope_cache(HEAD_DIM, 32, 10000.0, None)
    q, k, v = qkv_views(3, torch.float32)
    k_cache, v_cache, slots = cache_and_slots(3, torch.float32)
    with pytest.raises(RuntimeError, match="position 32 is out of range"):
        cpu_layer_ops.rope(torch.tensor([0, 32, 1]), q, k, cache)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_layer_ops.rope_write_kv(torch.tensor([0, 1, 2]), q, k, v, cache, k_cache, v_cache,
                                    torch.tensor([0, 1, k_cache.shape[0] * 16]))
    with pytest.raises(RuntimeError, match="dtype"):
        cpu_layer_ops.write_kv(k, v, k_cache.bfloat16(), v_cache.bfloat16(), slots)
    with pytest.raises(RuntimeError, match="residual"):
        cpu_layer_ops.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5, torch.randn(3, 8))


@needs_ops
def test_cpu_backend_runs_the_fused_ops():
    backend = CpuBackend()
    assert backend.fused
    q, k, v = qkv_views(5, torch.bfloat16)
    cache = build_rope_cache(HEAD_DIM, 8, 10000.0, None)
    k_cache, v_cache, slots = cache_and_slots(5, torch.bfloat16)
    with pytest.raises(RuntimeError, match="position 9 is out of range"):  # the C++ check
        backend.rope_write_kv(torch.tensor([0, 1, 2, 3, 9]), q, k, v, cache, k_cache, v_cache,
                              slots)


def test_without_a_compiler_the_cpu_backend_keeps_the_references(monkeypatch, tmp_path):
    if cpu_attention.load() is None:
        pytest.skip("the CPU backend needs the attention kernel")
    cpu_layer_ops.load.cache_clear()
    monkeypatch.setenv("PAGODA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    try:
        backend = CpuBackend()
        assert not backend.fused
        x, residual, weight = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16)
        for ours, ref in zip(backend.rms_norm(x, weight, 1e-5, residual),
                             TorchBackend().rms_norm(x, weight, 1e-5, residual)):
            assert torch.equal(ours, ref)
    finally:
        cpu_layer_ops.load.cache_clear()

