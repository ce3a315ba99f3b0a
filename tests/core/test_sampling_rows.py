"""Sampling parameters kept in per-request rows: each step gathers exactly its requests'
parameters, and the filters over a mixed batch equal a per-row reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.engine import sampler as sampler_module
from workers.engine.sampler import Sampler
from workers.engine.sampling_params import SamplingParams
from workers.engine.sequence import Sequence

VOCAB = 64
CPU = torch.device("cpu")


def seq(rid: str, **params) -> Sequence:
    return Sequence(rid, [1, 2, 3], SamplingParams(**params))


def allowed(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Tokens left by top-k, then top-p (a token stays while the mass before it is below
    top_p), then min-p, one row in float64."""
    vocab = len(logits)
    keep = np.ones(vocab, dtype=bool)
    order = np.argsort(-logits, kind="stable")
    if 0 < p.top_k < vocab:
        keep[order[p.top_k:]] = False
    masked = np.where(keep, logits, -np.inf)
    probs = np.exp(masked - masked.max())
    probs /= probs.sum()
    before = np.cumsum(probs[order]) - probs[order]
    keep[order[before >= p.top_p]] = False
    masked = np.where(keep, logits, -np.inf)
    probs = np.exp(masked - masked.max())
    probs /= probs.sum()
    return keep & (probs >= probs.max() * p.min_p)


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


@pytest.mark.parametrize("vocab,candidates,scale,widths", [
    (VOCAB, 256, 3.0, [VOCAB]),  # fewer tokens than top-p's candidates: all sorted
    (1024, 32, 6.0, [32]),  # peaked: every nucleus lies among the 32 candidates
    (1024, 32, 0.5, [32, 1024]),  # flat: nuclei run past them: those rows are sorted whole
], ids=["small-vocabulary", "nucleus-in-candidates", "nucleus-past-candidates"])
@pytest.mark.parametrize("seed", range(3))
def test_a_mixed_batch_samples_only_what_each_rows_filters_allow(monkeypatch, vocab, candidates,
                                                                 scale, widths, seed):
    monkeypatch.setattr(sampler_module, "TOP_P_CANDIDATES", candidates)
    seen: list[int] = []
    top_k_top_p = Sampler._top_k_top_p

    def spy(self, logits, params, width, use_p):
        seen.append(width)
        return top_k_top_p(self, logits, params, width, use_p)

    monkeypatch.setattr(Sampler, "_top_k_top_p", spy)
    settings = [dict(temperature=0.7, top_k=5), dict(top_p=0.8), dict(temperature=1.3, min_p=0.2),
                dict(temperature=0.9, top_k=10, top_p=0.5, min_p=0.05), dict(),
                dict(temperature=0.0, top_k=7), dict(top_k=1)]
    seqs = [seq(f"r{i}", **s) for i, s in enumerate(settings)]
    sampler = Sampler(vocab, frozenset(), max_num_seqs=8, device=CPU)
    logits = torch.randn(len(seqs), vocab, generator=torch.Generator().manual_seed(seed)) * scale
    params, host = sampler.rows.gather(seqs)
    temps = [s.params.temperature or 1.0 for s in seqs]
    scaled = logits / torch.tensor(temps)[:, None]
    filtered = sampler._top_k_top_p_min_p(scaled.clone(), params, host)
    assert seen == widths
    want = [allowed(scaled[i].double().numpy(), s.params) for i, s in enumerate(seqs)]
    for i in range(len(seqs)):
        assert (torch.isfinite(filtered[i]).numpy() == want[i]).all(), settings[i]
    argmax = logits.argmax(dim=-1).tolist()
    for _ in range(50):
        tokens = sampler._sample(logits.clone(), seqs).tolist()
        assert all(want[i][t] for i, t in enumerate(tokens))
        assert tokens[5] == argmax[5] and tokens[6] == argmax[6]  # greedy and top-k 1


def test_top_k_alone_looks_at_the_largest_k_and_unfiltered_rows_keep_every_token():
    seqs = [seq("k3", top_k=3), seq("k9", top_k=9), seq("all")]
    sampler = Sampler(1024, frozenset(), max_num_seqs=4, device=CPU)
    logits = torch.randn(3, 1024, generator=torch.Generator().manual_seed(0))
    params, host = sampler.rows.gather(seqs)
    filtered = sampler._top_k_top_p_min_p(logits.clone(), params, host)
    for i, s in enumerate(seqs):
        assert (torch.isfinite(filtered[i]).numpy() == allowed(logits[i].double().numpy(),
                                                               s.params)).all()
    assert torch.isfinite(filtered).sum(dim=-1).tolist() == [3, 9, 1024]
