"""Paged KV cache bookkeeping: fixed-size blocks, ref counts, and automatic prefix caching.

A full block is found by a hash chained over every token before it, so two sequences with the
same prefix share the same physical blocks. A hit is trusted only when the block holds the same
tokens after the same parent block (its id and version), so a hash collision is a miss, never
another prompt's KV. Freed blocks keep their hash and stay reusable until the LRU free list
hands them out again.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from workers.engine.block_hash import compute_block_hashes  # noqa: F401  (re-exported for routers)
from workers.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set while the block is registered in the prefix cache
    version: int = 0  # bumped whenever the block is handed out for new content
    token_ids: tuple[int, ...] = ()  # what a cached block holds, checked on every hit
    parent: tuple[int, int] | None = None  # (block id, version) before it; None: first block


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free = OrderedDict.fromkeys(range(num_blocks))  # front is evicted first
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found cached

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_hashes(self) -> list[int]:
        return list(self.cached)

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks matching seq's leading full blocks (leaving a token to compute)."""
        if not self.enable_prefix_caching:
            return []
        hashes = seq.block_hashes(self.block_size)
        found: list[int] = []
        parent = None
        for i, h in enumerate(hashes[: (seq.num_tokens - 1) // self.block_size]):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.parent != parent or block.token_ids != self._tokens(seq, i):
                break  # a hash collision
            found.append(block_id)
            parent = (block_id, block.version)
        return found

    def _tokens(self, seq: Sequence, index: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[index * self.block_size:(index + 1) * self.block_size])

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] | None = None) -> bool:
        """Give seq blocks for num_new_tokens more tokens; False (and no change) if out of blocks.

        `cached` are prefix-cache hits for a sequence that holds no blocks yet.
        """
        if not cached:  # a running sequence growing: most calls
            needed = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size) - \
                len(seq.block_table)
            if needed > len(self.free):
                return False
        else:
            reused_free = sum(1 for b in cached if self.blocks[b].ref_count == 0)
            needed = self.blocks_needed(len(cached) * self.block_size + num_new_tokens) - \
                len(seq.block_table) - len(cached)
            if needed + reused_free > self.num_free_blocks:
                return False
            for block_id in cached:
                block = self.blocks[block_id]
                if block.ref_count == 0:
                    del self.free[block_id]
                block.ref_count += 1
                seq.block_table.append(block_id)
        for _ in range(needed):
            seq.block_table.append(self._take_free())
        return True

    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict it from the prefix cache
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
        block.version += 1
        block.ref_count = 1
        return block_id

    def cache_full_blocks(self, seqs: Iterable[Sequence]) -> None:
        """Register the full blocks computed since the last call in the prefix cache; most
        steps fill none. Finished and preempted sequences hold no blocks and are skipped."""
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        for seq in seqs:
            if seq.num_computed_tokens >= (seq.num_registered_blocks + 1) * size and \
                    seq.block_table:
                self._register_full_blocks(seq)

    def _register_full_blocks(self, seq: Sequence) -> None:
        full = seq.num_computed_tokens // self.block_size
        hashes = seq.block_hashes(self.block_size)
        for i in range(seq.num_registered_blocks, min(full, len(hashes))):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and hashes[i] not in self.cached:
                block.hash = hashes[i]
                block.token_ids = self._tokens(seq, i)
                previous = self.blocks[seq.block_table[i - 1]] if i else None
                block.parent = (previous.block_id, previous.version) if previous else None
                self.cached[hashes[i]] = block.block_id
        seq.num_registered_blocks = max(seq.num_registered_blocks, min(full, len(hashes)))

    def free_seq(self, seq: Sequence) -> None:
        # Reverse order: a sequence's tail blocks are the least likely to be shared, evict first.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:
                    self.free.move_to_end(block_id, last=False)  # worthless: reuse first
        seq.block_table = []
        seq.num_registered_blocks = 0
