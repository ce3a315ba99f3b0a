"""Continuous batching: every step mixes running decodes with chunked prefills under a token budget.

Running sequences are served first (FCFS), then waiting ones are admitted while the token
budget, the sequence limit and free KV blocks allow. When blocks run out, the newest running
sequence is preempted by recompute: its blocks are freed and it goes back to the front of the
queue (the prefix cache usually makes the recompute cheap).

In a pipeline (`pipelined`) several micro-batches are in flight at once: a sequence whose
sampled token is still in one waits for it, so micro-batches hold disjoint decodes. A prefill
chunk may follow the previous chunk of its prompt before that one is done: every stage runs
the micro-batches in order, so the KV it reads is always written first.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from workers.engine.block_manager import BlockManager
from workers.engine.sequence import Sequence, SequenceStatus

PREFILL_KEY = 1 << 40  # sorts a prefill after every decode


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def sort(self, keys: list[int]) -> None:
        """Into the order of keys, one per sequence (steady decodes keep their order)."""
        if keys != sorted(keys):
            order = sorted(range(len(keys)), key=keys.__getitem__)
            self.seqs = [self.seqs[i] for i in order]
            self.num_new_tokens = [self.num_new_tokens[i] for i in order]

    def sampling_seqs(self) -> list[Sequence]:
        """Before the step: the sequences it takes to their last known or in-flight token,
        which sample, in batch order."""
        return [s for s, n in zip(self.seqs, self.num_new_tokens, strict=True)
                if s.num_computed_tokens + n == s.num_scheduled_tokens]

    def split(self) -> tuple[ScheduledBatch, ScheduledBatch]:
        half = len(self.seqs) // 2
        return (ScheduledBatch(self.seqs[:half], self.num_new_tokens[:half]),
                ScheduledBatch(self.seqs[half:], self.num_new_tokens[half:]))


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, pipelined: bool = False) -> None:
        self.block_manager = block_manager
        self.pipelined = pipelined
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, max_seqs: int | None = None) -> ScheduledBatch:
        """The next step's batch, decodes first and longest context first (attention backends
        batch them in slices; running sequences, oldest first, are mostly in that order
        already); `max_seqs`: at most this many sequences (a pipeline's micro-batch)."""
        batch = ScheduledBatch()
        keys: list[int] = []  # each sequence's place in that order
        limit = max_seqs or self.max_num_seqs
        seqs, counts = batch.seqs, batch.num_new_tokens
        budget = self.max_num_batched_tokens
        preemptions = self.num_preemptions
        block_size = self.block_manager.block_size
        for seq in self.running:  # preemptions pop from its end: the loop stops before them
            if budget <= 0 or len(seqs) >= limit:
                break
            pending = seq.num_pending
            # its token is in a pipeline, or ends it (token_limit) when it reaches the host
            if pending and (self.pipelined or
                            len(seq.token_ids) + pending >= seq.token_limit):
                continue
            computed = seq.num_computed_tokens
            n = len(seq.token_ids) + pending - computed  # num_scheduled_tokens, inline
            if n > budget:
                n = budget
            # most decodes fit in the blocks they hold: checked here, without the calls
            if computed + n > len(seq.block_table) * block_size and \
                    not self._allocate(seq, n):
                break  # seq itself was preempted: it was the last one running
            seqs.append(seq)
            counts.append(n)
            keys.append(-computed if n == 1 else PREFILL_KEY + computed)
            budget -= n
        preempted = self.num_preemptions > preemptions
        # Admit waiting sequences only when nothing had to be preempted this step.
        while (self.waiting and budget > 0 and not preempted and len(seqs) < limit
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            if self.pipelined and seq.num_pending:
                break  # preempted with a token in a pipeline: it resumes once that is back
            # prompt logprobs need every prompt position computed: no prefix reuse
            cached = [] if seq.params.prompt_logprobs is not None else \
                self.block_manager.find_cached_prefix(seq)
            num_cached = len(cached) * self.block_manager.block_size
            n = min(seq.num_tokens - num_cached, budget)
            if not self.block_manager.allocate(seq, n, cached):
                break
            self.waiting.popleft()
            self._count_prefix_lookup(seq, num_cached)
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            keys.append(-num_cached if n == 1 else PREFILL_KEY + num_cached)
            budget -= n
        batch.sort(keys)
        return batch

    def _allocate(self, seq: Sequence, n: int) -> bool:
        """Blocks for n more tokens of running seq, preempting the newest running sequences
        until they fit; False if seq itself had to go."""
        while not self.block_manager.allocate(seq, n):
            victim = self.running.pop()  # newest first
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _count_prefix_lookup(self, seq: Sequence, num_cached: int) -> None:
        if seq.num_preemptions == 0:  # count each prompt once, not its recomputes
            num_cached = min(num_cached, seq.num_prompt_tokens)  # a resumed request's output
            seq.num_cached_tokens = num_cached
            self.block_manager.prefix_queries += seq.num_prompt_tokens
            self.block_manager.prefix_hits += num_cached

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_seq(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark seq finished and return its blocks; works for waiting and running seqs."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = seq.finish_reason or reason
