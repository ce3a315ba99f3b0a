"""The sampler on a CPU, by PyTorch and by the C++ extension: each row keeps exactly what its
filters allow, and its tokens follow its filtered distribution (one uniform draw per row, found
in the row's cumulative weights)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.engine import cpu_sampling
from workers.engine import sampler as sampler_module
from workers.engine.sampler import Sampler
from workers.engine.sampling_params import SamplingParams
from workers.engine.sequence import Sequence

VOCAB = 64
CPU = torch.device("cpu")
LOGITS = torch.tensor([0.3, 2.0, -1.0, 1.2, -4.0, 0.9, 1.6, -0.2])


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


def probabilities(params: SamplingParams) -> np.ndarray:
    """LOGITS' probabilities in float64 under params: temperature, then the filters."""
    scaled = LOGITS.double().numpy() / params.temperature
    probs = np.where(allowed(scaled, params), np.exp(scaled - scaled.max()), 0.0)
    return probs / probs.sum()


@pytest.fixture(params=["pytorch", "cpu-extension"])
def sampling_path(request, monkeypatch):
    """The sampler with each of its ways to draw on a CPU."""
    if request.param == "pytorch":
        monkeypatch.setattr(cpu_sampling, "load", lambda: None)
    elif cpu_sampling.load() is None:
        pytest.skip("the C++ sampling extension did not build on this machine")
    return request.param


@pytest.mark.parametrize("vocab,scale", [(VOCAB, 3.0), (1024, 6.0), (1024, 0.5), (49152, 2.0)],
                         ids=["small-vocabulary", "peaked", "flat", "real-vocabulary"])
@pytest.mark.parametrize("seed", range(3))
def test_a_mixed_batch_samples_only_what_each_rows_filters_allow(sampling_path, vocab, scale,
                                                                 seed):
    settings = [dict(temperature=0.7, top_k=5), dict(top_p=0.8), dict(temperature=1.3, min_p=0.2),
                dict(temperature=0.9, top_k=10, top_p=0.5, min_p=0.05), dict(),
                dict(temperature=0.0, top_k=7), dict(top_k=1), dict(top_k=30000, top_p=0.99)]
    seqs = [seq(f"r{i}", **s) for i, s in enumerate(settings)]
    sampler = Sampler(vocab, frozenset(), max_num_seqs=len(seqs), device=CPU)
    logits = torch.randn(len(seqs), vocab, generator=torch.Generator().manual_seed(seed)) * scale
    params, host = sampler.rows.gather(seqs)
    temps = [s.params.temperature or 1.0 for s in seqs]
    scaled = logits / torch.tensor(temps)[:, None]
    filtered = sampler._top_k_top_p_min_p(scaled.clone(), params, host)
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


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.7, top_k=5),
                                      dict(temperature=1.5, top_p=0.8), dict(min_p=0.3)],
                         ids=["temperature", "top-k", "top-p", "min-p"])
def test_token_frequencies_match_the_rows_probabilities(sampling_path, settings):
    rows = 4000
    torch.manual_seed(0)
    sampler = Sampler(len(LOGITS), frozenset(), max_num_seqs=rows, device=CPU)
    seqs = [seq(f"r{i}", **settings) for i in range(rows)]
    tokens = sampler(LOGITS.expand(rows, -1).clone(), seqs).token_ids
    freq = np.bincount(tokens, minlength=len(LOGITS)) / rows
    want = probabilities(seqs[0].params)
    sigma = np.sqrt(want * (1 - want) / rows)
    assert (np.abs(freq - want) <= 4 * sigma + 1e-12).all(), (freq, want)


@pytest.mark.parametrize("draw,token", [(1.0, 6), (1e-30, 1)])
def test_the_extreme_draws_land_on_the_first_and_last_kept_tokens(sampling_path, monkeypatch,
                                                                  draw, token):
    # top-k 3 keeps tokens 1, 3 and 6 (logits 2.0, 1.2, 1.6): the lowest and highest kept
    # indices are 1 and 6, and the cumulative sum is flat before 1 and after 6
    monkeypatch.setattr(sampler_module, "uniform_draws",
                        lambda n, device, generator=None: torch.full((n,), draw))
    sampler = Sampler(len(LOGITS), frozenset(), max_num_seqs=1, device=CPU)
    tokens = sampler(LOGITS[None].clone(), [seq("r", top_k=3)]).token_ids
    assert tokens == [token]


def test_a_draw_is_never_zero():
    draws = sampler_module.uniform_draws(100_000, CPU, torch.Generator().manual_seed(0))
    assert draws.min() > 0 and draws.max() <= 1


def test_a_nucleus_that_ends_among_near_equal_tokens_is_cut_token_by_token(sampling_path):
    # one likely token, then 999 nearly equal ones: top-p 0.5 keeps the likely one and about
    # 430 of the others, its cut falling among tokens of almost the same weight
    vocab, rows = 1000, 4000
    logits = torch.cat([torch.tensor([5.0]), torch.arange(1, vocab) * 1e-6])
    params = SamplingParams(top_p=0.5)
    want = allowed(logits.double().numpy(), params)
    assert 300 < want.sum() < 600
    torch.manual_seed(0)
    sampler = Sampler(vocab, frozenset(), max_num_seqs=rows, device=CPU)
    seqs = [seq(f"r{i}", top_p=0.5) for i in range(rows)]
    tokens = sampler(logits.expand(rows, -1).clone(), seqs).token_ids
    assert want[tokens].all()
    assert len(set(tokens)) > 0.9 * want.sum()  # the draws reach across the whole nucleus


def test_a_row_of_nan_logits_still_gets_a_token_of_the_vocabulary(sampling_path):
    seqs = [seq("greedy", temperature=0.0), seq("sampled"), seq("nucleus", top_p=0.9)]
    sampler = Sampler(VOCAB, frozenset(), max_num_seqs=len(seqs), device=CPU)
    logits = torch.full((len(seqs), VOCAB), float("nan"))
    logits[0, 0] = 0.0  # not all greedy rows: the batch goes through the sampling path
    tokens = sampler._sample(logits, seqs).tolist()
    assert all(0 <= t < VOCAB for t in tokens)


def test_penalties_change_only_the_logits_of_tokens_each_row_has_seen():
    vocab = 1000
    gen = torch.Generator().manual_seed(0)
    settings = [dict(repetition_penalty=1.3), dict(frequency_penalty=0.5),
                dict(presence_penalty=-0.4, frequency_penalty=0.2), dict(),
                dict(repetition_penalty=0.8, presence_penalty=1.0)]
    seqs = []
    for i, s in enumerate(settings):
        prompt = torch.randint(0, vocab, (30,), generator=gen).tolist()
        seqs.append(Sequence(f"r{i}", prompt, SamplingParams(**s)))
        seqs[-1].token_ids += torch.randint(0, 50, (40,), generator=gen).tolist()  # repeats
    sampler = Sampler(vocab, frozenset(), max_num_seqs=len(seqs), device=CPU)
    logits = torch.randn(len(seqs), vocab, generator=gen) * 3
    penalized = logits.clone()
    sampler._apply_penalties(penalized, seqs)
    for i, s in enumerate(seqs):
        p = s.params
        want = logits[i].double().numpy().copy()
        seen = np.unique(s.token_ids)
        want[seen] = np.where(want[seen] > 0, want[seen] / p.repetition_penalty,
                              want[seen] * p.repetition_penalty)
        counts = np.bincount(s.output_token_ids, minlength=vocab)
        want -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        assert np.allclose(penalized[i].numpy(), want, rtol=1e-6, atol=1e-6), settings[i]
