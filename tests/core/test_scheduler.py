"""Scheduler in pure Python, fed hand-made model outputs (no model)."""
from __future__ import annotations

from workers.engine.block_manager import BlockManager
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import Scheduler
from workers.engine.sequence import Sequence, SequenceStatus

BS = 4


def make(num_blocks=64, max_seqs=8, budget=16, caching=True):
    bm = BlockManager(num_blocks, BS, caching)
    return bm, Scheduler(bm, max_seqs, budget)


def run_step(sched: Scheduler, next_token: int = 7):
    """Pretend the model ran: advance computed tokens and append a token where sampled."""
    batch = sched.schedule()
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        sched.block_manager.cache_full_blocks([s])
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(next_token)
    return batch


def test_chunked_prefill_respects_token_budget_and_mixes_with_decodes():
    _, sched = make(budget=16)
    a = Sequence("a", list(range(10)), SamplingParams())
    sched.add(a)
    b1 = run_step(sched)
    assert b1.num_new_tokens == [10] and a.num_output_tokens == 1
    b = Sequence("b", list(range(100, 140)), SamplingParams())
    sched.add(b)
    b2 = run_step(sched)
    # a decodes one token; b's 40-token prompt is chunked into the remaining 15
    assert [s.request_id for s in b2.seqs] == ["a", "b"]
    assert b2.num_new_tokens == [1, 15]
    assert b.num_output_tokens == 0  # a partial prefill samples nothing
    b3 = run_step(sched)
    assert b3.num_new_tokens == [1, 15]
    b4 = run_step(sched)
    assert b4.num_new_tokens == [1, 10] and b.num_output_tokens == 1
    assert sum(b4.num_new_tokens) <= 16


def test_fcfs_and_max_num_seqs():
    _, sched = make(max_seqs=2, budget=100)
    seqs = [Sequence(str(i), [1, 2, 3], SamplingParams()) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch = run_step(sched)
    assert [s.request_id for s in batch.seqs] == ["0", "1"]
    assert seqs[2].status == SequenceStatus.WAITING
    sched.finish(seqs[0], "stop")
    batch = run_step(sched)
    assert [s.request_id for s in batch.seqs] == ["1", "2"]


def test_preemption_newest_first_and_blocks_return():
    bm, sched = make(num_blocks=4, budget=64, caching=False)
    old = Sequence("old", list(range(7)), SamplingParams())
    new = Sequence("new", list(range(50, 57)), SamplingParams())
    sched.add(old), sched.add(new)
    run_step(sched)  # 7 prompt tokens each -> 2 blocks each, pool full
    run_step(sched)  # position 7 still fits
    assert bm.num_free_blocks == 0
    run_step(sched)  # old needs a 3rd block for position 8: new is preempted
    assert sched.num_preemptions == 1
    assert new.status == SequenceStatus.WAITING and new.block_table == []
    assert new.num_computed_tokens == 0 and new.num_output_tokens == 2
    assert sched.waiting[0] is new and old.status == SequenceStatus.RUNNING
    sched.finish(old, "stop")
    batch = run_step(sched)  # new is recomputed over prompt + its output token
    assert batch.seqs == [new] and batch.num_new_tokens == [9]
    sched.finish(new, "stop")
    assert bm.num_free_blocks == 4


def test_abort_waiting_and_running_frees_blocks():
    bm, sched = make(num_blocks=8, max_seqs=1)
    a = Sequence("a", list(range(5)), SamplingParams())
    b = Sequence("b", list(range(5)), SamplingParams())
    sched.add(a), sched.add(b)
    run_step(sched)
    sched.finish(b, "abort")
    sched.finish(a, "abort")
    assert not sched.has_work() and bm.num_free_blocks == 8
    assert a.finish_reason == "abort" and b.status == SequenceStatus.FINISHED


def test_prefix_cache_skips_computed_blocks():
    bm, sched = make(budget=64)
    first = Sequence("first", list(range(13)), SamplingParams())
    sched.add(first)
    run_step(sched)
    sched.finish(first, "stop")
    second = Sequence("second", list(range(13)) + [99], SamplingParams())
    sched.add(second)
    batch = run_step(sched)
    assert batch.num_new_tokens == [14 - 12] and second.num_cached_tokens == 12
    assert bm.prefix_hits == 12 and bm.prefix_queries == 13 + 14


def test_decodes_lead_the_batch_longest_context_first():
    """Attention slices decodes from the front of the batch, grouped by length; running
    sequences, oldest (longest) first, keep their order."""
    _, sched = make(budget=64)
    short = Sequence("short", list(range(3)), SamplingParams())
    long = Sequence("long", list(range(9)), SamplingParams())
    for s in (short, long):
        sched.add(s)
    run_step(sched)  # both prefill
    late = Sequence("late", list(range(100, 120)), SamplingParams())
    sched.add(late)
    batch = run_step(sched)
    assert [s.request_id for s in batch.seqs] == ["long", "short", "late"]
    assert batch.num_new_tokens == [1, 1, 20]
    batch = run_step(sched)
    assert [s.request_id for s in batch.seqs] == ["late", "long", "short"]
