"""TritonBackend against TorchBackend through the shared AttentionMetadata interface."""
from __future__ import annotations

import pytest
import torch
from kernel_inputs import ATTN_DTYPES, DEVICE, random_block_tables, random_cache, tolerance

from kernels.reference import KV_FP8
from workers.engine.attention import AttentionMetadata, TorchBackend
from workers.engine.backends import get_backend
from workers.engine.triton_backend import FlashBackend, TritonBackend


def make_meta(query_lens: list[int], seq_lens: list[int], block_size: int,
              num_blocks: int) -> AttentionMetadata:
    tables = random_block_tables(seq_lens, block_size, num_blocks)
    slots = []
    for table, q_len, n in zip(tables.tolist(), query_lens, seq_lens):
        slots += [table[p // block_size] * block_size + p % block_size for p in range(n - q_len, n)]
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=tables, query_start_loc_cpu=starts, query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens, max_query_len=max(query_lens), max_seq_len=max(seq_lens))


@pytest.mark.parametrize("kv_fp8", [False, True], ids=["kv_same", "kv_fp8"])
@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("query_lens,seq_lens", [
    ([1, 1, 1], [1, 16, 33]),                # decode only
    ([9, 1, 4], [9, 40, 20]),                # prompt, decode and a chunk after a prefix
])
def test_write_then_attend_matches_torch_backend(query_lens, seq_lens, dtype, kv_fp8):
    block_size, num_kv_heads, num_heads, head_dim = 16, 2, 6, 64
    num_blocks = 12
    meta = make_meta(query_lens, seq_lens, block_size, num_blocks)
    k_cache, v_cache = (c.to(KV_FP8) if kv_fp8 else c for c in
                        random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype))
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, dtype=dtype, device=DEVICE)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v = torch.randn_like(k)
    results = []
    for backend in (TritonBackend(), TorchBackend()):
        kc, vc = k_cache.clone(), v_cache.clone()
        backend.write_kv(k, v, kc, vc, meta.slot_mapping)
        results.append((kc, vc, backend.attention(q, kc, vc, meta, head_dim ** -0.5)))
    (kc, vc, out), (kc_ref, vc_ref, out_ref) = results
    # as bytes: E4M3 tensors have no equal() on the CPU
    assert torch.equal(kc.view(torch.uint8), kc_ref.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), vc_ref.view(torch.uint8))
    torch.testing.assert_close(out, out_ref, **tolerance(dtype))


def test_layer_ops_match_torch_backend():
    ours, ref = TritonBackend(), TorchBackend()
    x = torch.randn(4, 128, device=DEVICE)
    residual = torch.randn_like(x)
    weight = torch.randn(128, device=DEVICE)
    for a, b in zip(ours.rms_norm(x, weight, 1e-5, residual), ref.rms_norm(x, weight, 1e-5,
                                                                            residual)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.silu_mul(x), ref.silu_mul(x))
    cache = torch.randn(32, 64, device=DEVICE)
    positions = torch.tensor([0, 5, 31, 2], device=DEVICE)
    q, k = torch.randn(4, 3, 64, device=DEVICE), torch.randn(4, 1, 64, device=DEVICE)
    for a, b in zip(ours.rope(positions, q, k, cache), ref.rope(positions, q, k, cache)):
        torch.testing.assert_close(a, b)


def test_rope_write_kv_matches_torch_backend():
    meta = make_meta([3, 1], [3, 20], 16, 4)
    positions = torch.tensor([0, 1, 2, 19], device=DEVICE)
    cache = torch.randn(32, 64, device=DEVICE)
    qkv = torch.randn(4, 4 * 64, device=DEVICE)  # q, k, v as strided views, as the model has them
    q, k, v = (t.view(4, -1, 64) for t in qkv.split([2 * 64, 64, 64], dim=-1))
    k_cache, v_cache = random_cache(4, 16, 1, 64, torch.float32)
    results = []
    for backend in (TritonBackend(), TorchBackend()):
        kc, vc = k_cache.clone(), v_cache.clone()
        results.append((backend.rope_write_kv(positions, q, k, v, cache, kc, vc,
                                              meta.slot_mapping), kc, vc))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref)


def test_backend_selection():
    assert isinstance(get_backend("triton", DEVICE), TritonBackend)
    assert isinstance(get_backend("auto", torch.device("cpu")), TorchBackend)
    # an E4M3 cache: only the Triton and torch backends read it
    assert get_backend("auto", torch.device("cpu"), fp8_kv=True).name == "torch"
    assert get_backend("auto", torch.device("cuda"), fp8_kv=True).name == "triton"
    try:
        import vllm_flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="vllm-flash-attn"):
            FlashBackend()
    else:
        assert get_backend("auto", torch.device("cuda")).name == "flash"
