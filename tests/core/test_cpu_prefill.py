"""The C++ CPU paged prefill against the gather-and-softmax reference, and its place in the
CPU backend."""
from __future__ import annotations

import pytest
import torch

from kernels.reference import paged_prefill_ref
from tests.core.cpu_kernel_cases import DTYPES, TOLERANCE, scattered_caches
from workers.engine import cpu_attention, cpu_extension
from workers.engine.attention import AttentionMetadata, TorchBackend
from workers.engine.cpu_attention import CpuBackend

needs_kernel = pytest.mark.skipif(cpu_attention.load_prefill() is None,
                                  reason="the C++ prefill kernel did not build on this machine")
# (group, head_dim, block_size): head dims with register paths (32/64/96/128) and without (40, 80)
SHAPES = [(1, 64, 16), (3, 64, 16), (4, 128, 8), (8, 32, 32), (3, 96, 16), (2, 80, 12),
          (4, 40, 16), (1, 128, 1)]


def prefill_case(group: int, head_dim: int, block_size: int, dtype: torch.dtype,
                 query_lens: list[int], seq_lens: list[int], num_kv_heads: int = 2):
    """A flattened batch: sequence i has query_lens[i] new rows ending its seq_lens[i] positions
    (the rest a cached prefix), its blocks scattered at random over the cache."""
    k_cache, v_cache, tables = scattered_caches(seq_lens, block_size, num_kv_heads, head_dim,
                                                dtype)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], num_kv_heads * group, head_dim, dtype=dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
        query_start_loc_cpu=starts, query_lens_cpu=list(query_lens), seq_lens_cpu=list(seq_lens),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens))
    return q, k_cache, v_cache, meta


def run_kernel(q, k_cache, v_cache, meta, seqs: list[int], scale: float) -> torch.Tensor:
    out = torch.full_like(q, 7.0)  # rows of other sequences must keep this
    cpu_attention.paged_prefill_cpu(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                                    meta.seq_lens, torch.tensor(seqs, dtype=torch.int32), out,
                                    scale)
    return out


def rows_of(meta: AttentionMetadata, seqs: list[int]) -> torch.Tensor:
    starts = meta.query_start_loc_cpu
    return torch.cat([torch.arange(starts[i], starts[i + 1]) for i in seqs])


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim,block_size", SHAPES)
def test_matches_reference(group, head_dim, block_size, dtype):
    # whole prompts, chunks after a cached prefix, a decode row left alone, tiles cut short
    query_lens = [5, 33, 70, 1, 17, 2]
    seq_lens = [5, 40, 70, 9, 100, 2 * block_size + 3]
    q, k_cache, v_cache, meta = prefill_case(group, head_dim, block_size, dtype, query_lens,
                                             seq_lens)
    seqs = [i for i, n in enumerate(query_lens) if n > 1]
    out = run_kernel(q, k_cache, v_cache, meta, seqs, head_dim ** -0.5)
    ref = paged_prefill_ref(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                            meta.block_tables, head_dim ** -0.5)
    rows = rows_of(meta, seqs)
    torch.testing.assert_close(out[rows], ref[rows], **TOLERANCE[dtype])
    assert torch.all(out[meta.query_start_loc_cpu[3]] == 7.0)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_long_prompts_on_one_or_two_threads(dtype, threads):
    """Long prompts are cut into tiles shared between threads; large scores stay exact."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k_cache, v_cache, meta = prefill_case(3, 64, 16, dtype, [300, 129, 64], [300, 200, 64],
                                                 num_kv_heads=3)
        q *= 8
        out = run_kernel(q, k_cache, v_cache, meta, [0, 1, 2], 0.125)
        ref = paged_prefill_ref(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                                meta.block_tables, 0.125)
        torch.testing.assert_close(out, ref, **TOLERANCE[dtype])
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_mixed_batch_matches_torch_backend(dtype):
    """Decodes and prefills in one step: the CPU backend agrees with the PyTorch backend."""
    q, k_cache, v_cache, meta = prefill_case(3, 64, 16, dtype, [1, 1, 48, 1, 20],
                                             [30, 7, 48, 90, 61])
    cpu = CpuBackend()
    assert cpu.prefill_kernel
    out = cpu.attention(q, k_cache, v_cache, meta, 0.125)
    ref = TorchBackend().attention(q, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


@needs_kernel
def test_rejects_mismatched_inputs():
    q, k_cache, v_cache, meta = prefill_case(3, 64, 16, torch.float32, [4, 6], [4, 9])
    with pytest.raises(RuntimeError, match="int32"):
        cpu_attention.paged_prefill_cpu(q, k_cache, v_cache, meta.block_tables.long(),
                                        meta.query_start_loc, meta.seq_lens,
                                        torch.tensor([0, 1], dtype=torch.int32), q.clone(), 0.1)
    with pytest.raises(RuntimeError, match="dtype"):
        cpu_attention.paged_prefill_cpu(q, k_cache, v_cache, meta.block_tables,
                                        meta.query_start_loc, meta.seq_lens,
                                        torch.tensor([0, 1], dtype=torch.int32), q.bfloat16(), 0.1)


def test_without_the_prefill_kernel_the_backend_uses_torch(monkeypatch):
    """Where only the prefill kernel cannot build, prefills take the PyTorch path."""
    if cpu_attention.load() is None:
        pytest.skip("the C++ decode kernel did not build on this machine")
    monkeypatch.setattr(cpu_attention, "load_prefill", lambda: None)
    backend = CpuBackend()
    assert not backend.prefill_kernel
    q, k_cache, v_cache, meta = prefill_case(3, 64, 16, torch.float32, [1, 12], [5, 12])
    ref = TorchBackend().attention(q, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(backend.attention(q, k_cache, v_cache, meta, 0.125), ref)


def test_build_directory_follows_the_shared_header(tmp_path):
    """Editing a header the kernels include builds them afresh."""
    source, header = tmp_path / "kernel.cpp", tmp_path / "shared.h"
    source.write_text('#include "shared.h"')
    header.write_text("// one")
    first = cpu_extension.build_directory(cpu_attention.PREFILL_NAME, str(source))
    header.write_text("// two")
    assert cpu_extension.build_directory(cpu_attention.PREFILL_NAME, str(source)) != first
