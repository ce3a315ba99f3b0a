"""BlockManager in pure Python: ref counts, prefix caching, LRU eviction, no leaks."""
from __future__ import annotations

from workers.engine.block_manager import BlockManager, compute_block_hashes
from workers.engine.sampling_params import SamplingParams
from workers.engine.sequence import Sequence

BS = 4


def seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, tokens, SamplingParams())


def test_allocate_and_free_return_every_block():
    bm = BlockManager(8, BS)
    s = seq(list(range(10)))
    assert bm.allocate(s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    s.num_computed_tokens = 10
    assert bm.allocate(s, 2)  # 12 tokens still fit in 3 blocks
    assert len(s.block_table) == 3
    s.num_computed_tokens = 12
    assert bm.allocate(s, 1)
    assert len(s.block_table) == 4
    bm.free_seq(s)
    assert bm.num_free_blocks == 8 and s.block_table == []
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_failed_allocation_changes_nothing():
    bm = BlockManager(2, BS)
    s = seq(list(range(20)))
    assert not bm.allocate(s, 20)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_prefix_cache_hit_shares_blocks_and_leaves_a_token_to_compute():
    bm = BlockManager(16, BS)
    a = seq(list(range(12)), "a")
    assert bm.allocate(a, 12)
    a.num_computed_tokens = 12
    bm.cache_full_blocks([a])
    assert len(bm.cached) == 3
    # Same 12-token prompt: at most 2 blocks may be reused, the last token must be computed.
    b = seq(list(range(12)), "b")
    hits = bm.find_cached_prefix(b)
    assert hits == a.block_table[:2]
    assert bm.allocate(b, 4, hits)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    # A different second block stops the match after the first.
    c = seq([0, 1, 2, 3, 99, 5, 6, 7, 8], "c")
    assert bm.find_cached_prefix(c) == a.block_table[:1]
    bm.free_seq(a), bm.free_seq(b)
    assert bm.num_free_blocks == 16


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(4, BS)
    a = seq(list(range(8)), "a")
    assert bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks([a])
    bm.free_seq(a)
    assert bm.num_free_blocks == 4 and len(bm.cached) == 2
    again = seq(list(range(9)), "again")
    assert bm.find_cached_prefix(again) == [bm.cached[h] for h in compute_block_hashes(
        list(range(8)), BS)]
    # A new unrelated sequence taking all 4 blocks evicts the cached ones.
    d = seq(list(range(100, 116)), "d")
    assert bm.allocate(d, 16)
    assert bm.cached == {} and bm.num_free_blocks == 0
    assert bm.find_cached_prefix(again) == []


def test_hash_collision_is_a_miss(monkeypatch):
    monkeypatch.setattr("workers.engine.sequence.hash_block", lambda parent, tokens: 7)
    bm = BlockManager(8, BS)
    a = seq(list(range(9)), "a")
    assert bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.cache_full_blocks([a])
    assert len(bm.cached) == 1  # every block hashes alike: only the first is registered
    # same hash, other tokens: no hit, though the hash is cached
    assert bm.find_cached_prefix(seq([50, 51, 52, 53, 54], "b")) == []
    # the same tokens still hit
    assert bm.find_cached_prefix(seq(list(range(5)), "c")) == a.block_table[:1]


def test_a_child_block_is_no_hit_after_its_parent_was_reused(monkeypatch):
    monkeypatch.setattr("workers.engine.sequence.hash_block",
                        lambda parent, tokens: hash(tokens))  # ignores the prefix
    bm = BlockManager(3, BS)
    a = seq([1, 1, 1, 1, 2, 2, 2, 2, 0], "a")
    assert bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.cache_full_blocks([a])
    parent, child = a.block_table[:2]
    bm.free_seq(a)
    # evict the parent and refill it with other tokens, leaving the child cached
    bm.free.move_to_end(parent, last=False)
    b = seq([3, 3, 3, 3, 0], "b")
    assert bm.allocate(b, 5) and b.block_table[0] == parent
    b.num_computed_tokens = 5
    bm.cache_full_blocks([b])
    assert bm.blocks[child].hash is not None
    # [3,3,3,3] then [2,2,2,2]: the first block hits b's, the second must not take a's child,
    # whose KV was computed after [1,1,1,1]
    c = seq([3, 3, 3, 3, 2, 2, 2, 2, 0], "c")
    assert bm.find_cached_prefix(c) == [parent]


def test_block_hashes_are_chained_and_match_sequence_hashes():
    tokens = list(range(13))
    hashes = compute_block_hashes(tokens, BS)
    assert len(hashes) == 3
    assert seq(tokens).block_hashes(BS) == hashes
    # the same block content after a different prefix hashes differently
    other = compute_block_hashes([7, 7, 7, 7] + tokens[4:8], BS)
    assert other[1] != hashes[1]
