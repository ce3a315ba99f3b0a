"""Paged decode attention against the gather-and-softmax reference."""
from __future__ import annotations

import pytest
import torch
from kernel_inputs import ATTN_DTYPES, DEVICE, random_block_tables, random_cache, tolerance

from kernels.paged_decode import default_num_splits, paged_decode
from kernels.reference import paged_decode_ref

# (group, head_dim, block_size): GQA ratios 1/3/8 x head dims 64/128, several block sizes
SHAPES = [(1, 64, 16), (3, 128, 8), (8, 64, 32), (1, 128, 1), (3, 64, 12), (8, 128, 16)]


def run_case(group: int, head_dim: int, block_size: int, dtype: torch.dtype, seq_lens: list[int],
             num_splits: int, num_kv_heads: int = 2) -> None:
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    tables = random_block_tables(seq_lens, block_size, num_blocks)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, dtype=dtype, device=DEVICE)
    scale = head_dim ** -0.5
    out = paged_decode(q, k_cache, v_cache, tables, lens, scale, max_seq_len=max(seq_lens),
                       num_splits=num_splits)
    ref = paged_decode_ref(q, k_cache, v_cache, tables, lens, scale)
    torch.testing.assert_close(out, ref, **tolerance(dtype))


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("group,head_dim,block_size", SHAPES)
def test_decode_matches_reference(group, head_dim, block_size, dtype):
    # length 1, a full block, one past a block boundary, several blocks with a partial last one
    seq_lens = [1, block_size, block_size + 1, 3 * block_size + 5]
    run_case(group, head_dim, block_size, dtype, seq_lens, num_splits=1)


@pytest.mark.parametrize("num_splits", [2, 3, 16])
def test_split_k_merge_matches_reference(num_splits):
    # more splits than tiles leaves some splits empty; the merge must ignore them
    run_case(3, 64, 16, torch.float32, [1, 17, 150, 64], num_splits=num_splits)


def test_zero_length_row_is_zero():
    """Padded rows of a captured batch have seq_len 0 and must stay finite."""
    k_cache, v_cache = random_cache(4, 16, 2, 64, torch.float32)
    q = torch.randn(2, 4, 64, device=DEVICE)
    tables = torch.tensor([[1, 2], [0, 0]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([20, 0], dtype=torch.int32, device=DEVICE)
    for splits in (1, 3):
        out = paged_decode(q, k_cache, v_cache, tables, lens, 0.125, max_seq_len=2048,
                           num_splits=splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        torch.testing.assert_close(out[:1], paged_decode_ref(q, k_cache, v_cache, tables, lens,
                                                             0.125)[:1], **tolerance(q.dtype))


def test_wide_block_table_and_stale_entries_are_ignored():
    """Graph replays pass max_blocks_per_seq-wide tables whose tails hold stale block ids."""
    k_cache, v_cache = random_cache(12, 8, 1, 64, torch.float16)
    tables = random_block_tables([9, 20], 8, 12, width=10)
    tables[:, 3:] = 11  # garbage past each sequence's last block
    lens = torch.tensor([9, 20], dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 3, 64, dtype=torch.float16, device=DEVICE)
    out = paged_decode(q, k_cache, v_cache, tables, lens, 0.125, max_seq_len=80, num_splits=2)
    torch.testing.assert_close(out, paged_decode_ref(q, k_cache, v_cache, tables, lens, 0.125),
                               **tolerance(torch.float16))


def test_default_num_splits_is_one_on_cpu():
    assert default_num_splits(4, 8, 4096, torch.device("cpu")) == 1


@pytest.mark.parametrize("change,message", [
    ({"q": torch.zeros(2, 5, 64)}, "multiple of num_kv_heads"),
    ({"q": torch.zeros(2, 4, 32)}, "head_dim"),
    ({"seq_lens": torch.zeros(3, dtype=torch.int32)}, "one row per sequence"),
    ({"num_splits": 0}, "num_splits"),
    ({"q": torch.zeros(2, 4, 64, dtype=torch.float16)}, "cache dtype"),
])
def test_launcher_rejects_bad_arguments(change, message):
    k_cache, v_cache = random_cache(4, 16, 2, 64, torch.float32)
    args = {"q": torch.randn(2, 4, 64), "seq_lens": torch.ones(2, dtype=torch.int32),
            "num_splits": 1}
    args.update(change)
    tables = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        paged_decode(args["q"].to(DEVICE), k_cache, v_cache, tables, args["seq_lens"].to(DEVICE),
                     0.1, max_seq_len=16, num_splits=args["num_splits"])
