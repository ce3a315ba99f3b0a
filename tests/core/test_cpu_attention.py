"""The C++ CPU paged decode against the gather-and-softmax reference, and the fallback."""
from __future__ import annotations

import pytest
import torch

from kernels.reference import paged_decode_ref
from tests.core.cpu_kernel_cases import DTYPES, TOLERANCE, scattered_caches
from workers.engine import cpu_attention, cpu_extension
from workers.engine.attention import TorchBackend
from workers.engine.backends import get_backend
from workers.engine.cpu_attention import CpuBackend

needs_kernel = pytest.mark.skipif(cpu_attention.load() is None,
                                  reason="the C++ kernel did not build on this machine")
# (group, head_dim, block_size): GQA ratios 1/3/4/8, head dims 64/128 and odd ones, block sizes
SHAPES = [(1, 64, 16), (3, 64, 16), (3, 128, 8), (4, 64, 16), (8, 64, 32), (1, 128, 1),
          (3, 80, 12), (4, 40, 16)]


def cpu_case(group: int, head_dim: int, block_size: int, dtype: torch.dtype,
             seq_lens: list[int], num_kv_heads: int = 2):
    """Caches with each sequence's blocks scattered at random; tables padded with block 0."""
    k_cache, v_cache, tables = scattered_caches(seq_lens, block_size, num_kv_heads, head_dim,
                                                dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, dtype=dtype)
    return q, k_cache, v_cache, tables, lens


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim,block_size", SHAPES)
def test_matches_reference(group, head_dim, block_size, dtype):
    # length 1, a full block, one past a block boundary, several blocks with a partial last one
    seq_lens = [1, block_size, block_size + 1, 3 * block_size + 5, 300]
    q, k_cache, v_cache, tables, lens = cpu_case(group, head_dim, block_size, dtype, seq_lens)
    out = cpu_attention.paged_decode_cpu(q, k_cache, v_cache, tables, lens, head_dim ** -0.5)
    ref = paged_decode_ref(q, k_cache, v_cache, tables, lens, head_dim ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_long_contexts_split_across_threads(dtype, threads):
    """A lone long sequence is split into chunks merged by log-sum-exp; in a batch beside short
    ones, with padded rows, and on one thread or two, the result is the same attention."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seq_lens in ([1000], [16 * 9 + 7, 0, 3], [517, 33, 1, 260]):
            q, k_cache, v_cache, tables, lens = cpu_case(3, 64, 16, dtype, seq_lens, 3)
            out = cpu_attention.paged_decode_cpu(q, k_cache, v_cache, tables, lens, 0.125)
            ref = paged_decode_ref(q, k_cache, v_cache, tables, lens, 0.125)
            torch.testing.assert_close(out, ref, **TOLERANCE[dtype])
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_large_scores_and_zero_length_rows():
    """Scores far from zero stay exact (softmax subtracts the max); a length-0 row is zeros."""
    q, k_cache, v_cache, tables, lens = cpu_case(3, 64, 16, torch.float32, [40, 0, 7])
    q *= 30
    out = cpu_attention.paged_decode_cpu(q, k_cache, v_cache, tables, lens, 0.125)
    ref = paged_decode_ref(q, k_cache, v_cache, tables, lens, 0.125)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])
    assert torch.all(out[1] == 0)


@needs_kernel
def test_rejects_mismatched_inputs():
    q, k_cache, v_cache, tables, lens = cpu_case(3, 64, 16, torch.float32, [5, 9])
    with pytest.raises(RuntimeError, match="int32"):
        cpu_attention.paged_decode_cpu(q, k_cache, v_cache, tables.long(), lens, 0.1)
    with pytest.raises(RuntimeError, match="dtype"):
        cpu_attention.paged_decode_cpu(q.bfloat16(), k_cache, v_cache, tables, lens, 0.1)


@needs_kernel
def test_auto_backend_on_cpu_is_the_kernel():
    assert isinstance(get_backend("auto", torch.device("cpu")), CpuBackend)


def test_build_directory_follows_the_source(tmp_path):
    """An edited kernel source builds in its own directory, never over an older binary."""
    source = tmp_path / "kernel.cpp"
    source.write_text("// one")
    first = cpu_extension.build_directory(cpu_attention.NAME, str(source))
    source.write_text("// two")
    assert cpu_extension.build_directory(cpu_attention.NAME, str(source)) != first


def test_without_a_compiler_falls_back_to_torch(monkeypatch, tmp_path):
    """A machine where the extension cannot build serves from the PyTorch path."""
    cpu_attention.load.cache_clear()
    monkeypatch.setenv("PAGODA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    try:
        assert cpu_attention.load() is None
        backend = get_backend("auto", torch.device("cpu"))
        assert type(backend) is TorchBackend
        with pytest.raises(RuntimeError, match="could not be built"):
            get_backend("cpu", torch.device("cpu"))
    finally:
        cpu_attention.load.cache_clear()
