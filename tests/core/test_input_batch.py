"""The step plan from persistent block-table rows equals a plain per-token flattening."""
from __future__ import annotations

from workers.engine.input_batch import InputBatch
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import ScheduledBatch
from workers.engine.sequence import Sequence

BLOCK = 4


def seq(rid: str, prompt_len: int, output_len: int, computed: int, first_block: int,
        **params) -> Sequence:
    s = Sequence(rid, list(range(100, 100 + prompt_len)), SamplingParams(**params))
    s.token_ids += list(range(900, 900 + output_len))
    s.num_computed_tokens = computed
    s.block_table = list(range(first_block, first_block + -(-(s.num_tokens + 1) // BLOCK)))
    return s


def reference(batch: ScheduledBatch) -> dict:
    """Token by token: ids, positions, slots, which rows sample, prompt-logprob rows."""
    ids, pos, slots, sample, prompt, start = [], [], [], [], [], 0
    for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
        for p in range(s.num_computed_tokens, s.num_computed_tokens + n):
            ids.append(s.token_ids[p] if p < s.num_tokens else 0)
            pos.append(p)
            slots.append(s.block_table[p // BLOCK] * BLOCK + p % BLOCK)
        start += n
        if s.num_computed_tokens + n == s.num_scheduled_tokens:
            sample.append(start - 1)
        if s.params.prompt_logprobs is not None and \
                s.num_computed_tokens < s.num_prompt_tokens - 1:
            count = min(n, s.num_prompt_tokens - 1 - s.num_computed_tokens)
            prompt.append((i, start - n, count))
    return {"ids": ids, "pos": pos, "slots": slots, "sample": sample, "prompt": prompt}


def check(inputs: InputBatch, batch: ScheduledBatch) -> None:
    plan = inputs.plan(batch)
    want = reference(batch)
    assert plan.input_ids.tolist() == want["ids"]
    assert plan.positions.tolist() == want["pos"]
    assert plan.slot_mapping.tolist() == want["slots"]
    assert plan.sample_rows == want["sample"]
    assert plan.prompt_rows == want["prompt"]
    assert plan.seq_lens == [s.num_computed_tokens + n
                             for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)]
    assert plan.block_tables.shape[1] == max(len(s.block_table) for s in batch.seqs)
    for row, s in zip(plan.block_tables.tolist(), batch.seqs, strict=True):
        assert row[:len(s.block_table)] == s.block_table  # past it: never read


def test_decodes_only_and_mixed_with_chunked_prefills():
    inputs = InputBatch(max_num_seqs=4, max_blocks_per_seq=16, block_size=BLOCK)
    a, b = seq("a", 5, 3, 7, 0), seq("b", 9, 1, 9, 10)
    check(inputs, ScheduledBatch([a, b], [1, 1]))
    c = seq("c", 13, 0, 4, 20, prompt_logprobs=2)  # a chunk mid-prompt: no sample row
    d = seq("d", 6, 0, 0, 30)  # a whole prompt
    check(inputs, ScheduledBatch([a, b, c, d], [1, 1, 5, 6]))
    a.block_table.append(40)  # a block appended later reaches its row
    a.token_ids += [901] * 4
    a.num_computed_tokens += 4
    check(inputs, ScheduledBatch([b, a], [1, 1]))


def test_tokens_in_flight_and_row_reuse():
    inputs = InputBatch(max_num_seqs=2, max_blocks_per_seq=16, block_size=BLOCK)
    a, b = seq("a", 5, 2, 7, 0), seq("b", 5, 2, 7, 10)
    a.num_pending = b.num_pending = 1
    a.num_computed_tokens = b.num_computed_tokens = 7  # inputs: the tokens in flight
    a.pending_row, b.pending_row = 1, 0
    plan = inputs.plan(ScheduledBatch([a, b], [1, 1]))
    assert plan.pending == [(0, 1), (1, 0)] and plan.input_ids.tolist() == [0, 0]
    assert not plan.pending_in_place
    plan = inputs.plan(ScheduledBatch([b, a], [1, 1]))  # each in the row it was sampled in
    assert plan.pending == [(0, 0), (1, 1)] and plan.pending_in_place
    inputs.release("a")
    c = seq("c", 3, 0, 0, 50)  # takes a's row: its table is written whole
    check(inputs, ScheduledBatch([b, c], [1, 3]))


def test_no_free_row_takes_the_row_of_a_sequence_outside_the_batch():
    inputs = InputBatch(max_num_seqs=2, max_blocks_per_seq=16, block_size=BLOCK)
    a, b = seq("a", 5, 2, 6, 0), seq("b", 5, 2, 6, 10)
    check(inputs, ScheduledBatch([a, b], [1, 1]))
    a.block_table, a.num_computed_tokens = [], 0  # preempted: waits, still holding its row
    c = seq("c", 6, 0, 0, 20)
    check(inputs, ScheduledBatch([b, c], [1, 6]))  # c takes a's row, not b's
    inputs.release("b")
    c.token_ids.append(905)
    c.num_computed_tokens = 6
    a.block_table = [30, 31]  # a runs again: prefilled anew into other blocks
    check(inputs, ScheduledBatch([c, a], [1, 7]))
