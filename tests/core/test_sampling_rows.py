"""Sampling parameters kept in per-request rows: each step gathers exactly its requests'
parameters."""
from __future__ import annotations

import torch

from workers.engine.sampler import Sampler
from workers.engine.sampling_params import SamplingParams
from workers.engine.sequence import Sequence

VOCAB = 64
CPU = torch.device("cpu")


def seq(rid: str, **params) -> Sequence:
    return Sequence(rid, [1, 2, 3], SamplingParams(**params))


def test_rows_are_written_once_reused_and_taken_back_from_requests_outside_the_batch():
    sampler = Sampler(VOCAB, frozenset(), max_num_seqs=2, device=CPU)
    a = seq("a", temperature=0.5, top_k=3)
    b = seq("b", top_p=0.75)
    c = seq("c", min_p=0.125, top_k=1000)  # a top-k past the vocabulary keeps every token
    params, host = sampler.rows.gather([a, b])
    assert params.tolist() == host.tolist() == [[0.5, 3, 1.0, 0.0], [1.0, VOCAB, 0.75, 0.0]]
    params, _ = sampler.rows.gather([b, c])  # no row free: c takes a's, a is not in the step
    assert params.tolist() == [[1.0, VOCAB, 0.75, 0.0], [1.0, VOCAB, 1.0, 0.125]]
    sampler.release("b")
    params, _ = sampler.rows.gather([c, a])  # a is back: its parameters are written anew
    assert params.tolist() == [[1.0, VOCAB, 1.0, 0.125], [0.5, 3, 1.0, 0.0]]
