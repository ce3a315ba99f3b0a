"""Inputs shared by the tests of the C++ CPU attention kernels."""
from __future__ import annotations

import torch

TOLERANCE = {torch.float32: {"atol": 2e-5, "rtol": 2e-5},
             torch.float16: {"atol": 5e-3, "rtol": 5e-3},
             torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def scattered_caches(seq_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K and V caches with each sequence's blocks at random places, and the block tables
    (int32, padded with block 0)."""
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    perm = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(seq_lens), max(need), dtype=torch.int32)
    for i, k in enumerate(need):
        tables[i, :k] = torch.tensor(perm[:k], dtype=torch.int32)
        perm = perm[k:]
    return k_cache, v_cache, tables
