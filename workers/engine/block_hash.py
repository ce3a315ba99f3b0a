"""Chained hashes that name full KV blocks by every token before them."""
from __future__ import annotations

ROOT_HASH = 0  # parent of the first block; a constant so hashes agree across processes


def hash_block(parent: int, token_ids: tuple[int, ...]) -> int:
    # Python hashes ints and tuples of ints identically in every process (no hash seed).
    return hash((parent, token_ids))


def compute_block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Chained hashes of every full block of token_ids."""
    hashes, parent = [], ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, tuple(token_ids[start:start + block_size]))
        hashes.append(parent)
    return hashes
