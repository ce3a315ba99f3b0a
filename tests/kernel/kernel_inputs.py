"""Random inputs and tolerances shared by the kernel tests."""
from __future__ import annotations

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# the interpreter has no bf16 tl.dot
ATTN_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


def tolerance(dtype: torch.dtype) -> dict:
    """Kernel vs fp32 reference, both rounded to dtype at the end."""
    return {torch.float32: {"atol": 2e-5, "rtol": 2e-5},
            torch.float16: {"atol": 5e-3, "rtol": 5e-3},
            torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}[dtype]


def random_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return (torch.randn(shape, dtype=dtype, device=DEVICE),
            torch.randn(shape, dtype=dtype, device=DEVICE))


def random_block_tables(seq_lens: list[int], block_size: int, num_blocks: int,
                        width: int | None = None) -> torch.Tensor:
    """Distinct, shuffled physical blocks per sequence, padded with 0 like the engine does."""
    need = [-(-n // block_size) for n in seq_lens]
    width = width or max(max(need), 1)
    if sum(need) > num_blocks:
        raise ValueError("cache too small for these sequences")
    perm = torch.randperm(num_blocks).tolist()
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for i, k in enumerate(need):
        table[i, :k] = torch.tensor(perm[:k], dtype=torch.int32)
        perm = perm[k:]
    return table.to(DEVICE)
