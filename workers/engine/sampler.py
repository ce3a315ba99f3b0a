"""Turn one step's logits into next tokens, vectorized over the batch.

Order: logit_bias, penalties, min_tokens/grammar masks, then greedy or
temperature -> top-k -> top-p -> min-p -> sample. Logprobs are the model's raw log-softmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.engine import cpu_sampling
from workers.engine.outputs import TokenLogprob
from workers.engine.sampling_rows import MIN_P, TEMPERATURE, TOP_K, TOP_P, SamplingRows
from workers.engine.sequence import Sequence


def on_device(values: list | np.ndarray, device: torch.device) -> torch.Tensor:
    """Host values on the device without waiting for the device (an overlapped step runs)."""
    return torch.as_tensor(values).to(device, non_blocking=True)


def token_pairs(tokens: list[list[int]], rows: np.ndarray,
                vocab: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """The distinct (row, token) pairs of rows[i]'s tokens[i], and how often each occurs."""
    keys = np.concatenate([row * vocab + np.asarray(t, dtype=np.int64)
                           for row, t in zip(rows, tokens, strict=True)])
    keys, counts = np.unique(keys, return_counts=True)
    return (keys // vocab, keys % vocab), counts


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


@dataclass
class SampledTokens:
    """One step's sampled tokens, still on the device until `resolve` reads them."""

    token_ids: torch.Tensor  # [rows] int64
    raw_logprobs: torch.Tensor | None  # [rows, vocab] when any row wants logprobs
    want_logprobs: list[int | None]
    host: torch.Tensor | None = None  # pinned copy of token_ids, on a GPU
    copied: torch.cuda.Event | None = None

    def __post_init__(self) -> None:
        # Copied now, behind this step only: reading them later must not also wait for the
        # next step, queued on the same stream by then.
        if self.token_ids.is_cuda:
            self.host = torch.empty(self.token_ids.shape, dtype=self.token_ids.dtype,
                                    pin_memory=True)
            self.host.copy_(self.token_ids, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()

    def resolve(self) -> SamplerOutput:
        """The tokens on the host; waits for the device to sample them."""
        if self.host is not None and self.copied is not None:
            self.copied.synchronize()
            tokens = self.host.tolist()
        else:
            tokens = self.token_ids.tolist()
        return SamplerOutput(tokens, logprobs_of(self.raw_logprobs, tokens, self.want_logprobs))


def uniform_draws(n: int, device: torch.device | str,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The draws that pick n sampled tokens, in (0, 1]: above 0, so never a token the row
    gave no probability. A seeded request takes one from its generator per sampled token."""
    return 1 - torch.rand(n, device=device, generator=generator)


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: frozenset[int], max_num_seqs: int,
                 device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.rows = SamplingRows(max_num_seqs, vocab_size, device)
        # loaded now, not on the first sampled request: loading takes a second or more
        self.cpu_sampling = cpu_sampling.load() if device.type == "cpu" else None

    def release(self, request_id: str) -> None:
        """The request ended: its row of sampling parameters is free."""
        self.rows.release(request_id)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        return self.sample(logits, seqs).resolve()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampledTokens:
        # the runner's logits are this step's scratch: modified in place, never copied whole
        logits = logits[:, : self.vocab_size].float()
        if all([s.plain_greedy and s.grammar is None for s in seqs]):
            return SampledTokens(logits.argmax(dim=-1), None, [None] * len(seqs))
        want_logprobs = [s.params.logprobs for s in seqs]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(
            k is not None for k in want_logprobs) else None
        if not all([s.history_free and not s.params.logit_bias and s.grammar is None
                    for s in seqs]):  # some row has more than its logits to sample from
            self._apply_bias(logits, seqs)
            self._apply_penalties(logits, seqs)
            self._apply_masks(logits, seqs)
        return SampledTokens(self._sample(logits, seqs), raw_logprobs, want_logprobs)

    def _apply_bias(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for i, s in enumerate(seqs):
            for token, bias in s.params.logit_bias.items():
                rows.append(i)
                cols.append(token)
                vals.append(bias)
        if rows:
            logits[rows, cols] += on_device(vals, logits.device)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Repetition penalty on each row's tokens so far (prompt and output), then frequency
        and presence penalties on its output tokens: only at those (row, token) pairs, found
        once per step for the whole batch, not over each row's whole vocabulary."""
        repetition = np.array([s.params.repetition_penalty for s in seqs])
        frequency = np.array([s.params.frequency_penalty for s in seqs])
        presence = np.array([s.params.presence_penalty for s in seqs])
        rows = np.flatnonzero(repetition != 1.0)
        if len(rows):
            pairs, _ = token_pairs([seqs[i].token_ids for i in rows], rows, logits.shape[-1])
            row, token = (on_device(a, logits.device) for a in pairs)
            rep = on_device(repetition[pairs[0]], logits.device).to(logits.dtype)
            seen = logits[row, token]
            logits[row, token] = torch.where(seen > 0, seen / rep, seen * rep)
        rows = np.flatnonzero((frequency != 0) | (presence != 0))
        if len(rows):
            pairs, counts = token_pairs([seqs[i].output_token_ids for i in rows], rows,
                                        logits.shape[-1])
            row, token = (on_device(a, logits.device) for a in pairs)
            logits[row, token] -= on_device(frequency[pairs[0]] * counts + presence[pairs[0]],
                                            logits.device).to(logits.dtype)

    def _apply_masks(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for i, s in enumerate(seqs):
            if s.num_output_tokens < s.params.min_tokens:
                banned = list(s.params.stop_token_ids)
                if not s.params.ignore_eos:
                    banned += list(self.eos_token_ids)
                logits[i, banned] = -float("inf")
            if s.grammar is not None:
                s.grammar.mask_logits(logits[i])

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params, host = self.rows.gather(seqs)
        if not host[:, TEMPERATURE].any():  # all greedy, decided on the host: no device wait
            return logits.argmax(dim=-1)
        draws = uniform_draws(len(seqs), logits.device)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                draws[i] = uniform_draws(1, logits.device, s.generator)
        if self.cpu_sampling is not None:  # greedy rows get their argmax there too
            return self.cpu_sampling.sample(logits, params, draws)
        top = logits.max(dim=-1)
        sampled = self._draw(logits, top.values, params, host, draws)
        return torch.where(params[:, TEMPERATURE] == 0, top.indices, sampled)

    def _draw(self, logits: torch.Tensor, top: torch.Tensor, params: torch.Tensor,
              host: np.ndarray, draws: torch.Tensor) -> torch.Tensor:
        """Each row's token for its draw, in PyTorch: temperature, the filters, then the first
        token whose cumulative probability reaches the draw (one draw per row, not one per
        token: the exponential race draws a CPU's 1.5M exponentials in 30 ms)."""
        temperature = params[:, TEMPERATURE]
        scale = torch.where(temperature == 0, 1.0, temperature)[:, None]
        logits = self._top_k_top_p_min_p(logits / scale, params, host)
        cdf = (logits - top[:, None] / scale).exp_().cumsum_(dim=-1)
        # a row the model turned to NaN finds no token: it gets the last, not one past it
        return torch.searchsorted(cdf, draws[:, None] * cdf[:, -1:]).squeeze(1).clamp_(
            max=logits.shape[-1] - 1)

    def _top_k_top_p_min_p(self, logits: torch.Tensor, params: torch.Tensor,
                           host: np.ndarray) -> torch.Tensor:
        """params, host: the rows' sampling parameters on the device and on the host."""
        vocab = logits.shape[-1]
        top_k = host[:, TOP_K]
        use_p = bool((host[:, TOP_P] < 1.0).any())
        if use_p:  # the nucleus by a sort of each row
            logits = self._top_k_top_p(logits, params, vocab, use_p)
        elif (top_k < vocab).any():  # every row's top-k is among the largest k any row asks
            logits = self._top_k_top_p(logits, params, int(top_k[top_k < vocab].max()), use_p)
        if (host[:, MIN_P] > 0).any():
            min_p = params[:, MIN_P]
            probs = logits.softmax(dim=-1)
            threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
            logits = logits.masked_fill(probs < threshold, -float("inf"))
        return logits

    def _top_k_top_p(self, logits: torch.Tensor, params: torch.Tensor, width: int,
                     use_p: bool) -> torch.Tensor:
        """Each row's top-k, then its tokens while the mass before them is below top-p (the
        top token always), found among its `width` most likely tokens (all of them with
        top-p)."""
        vocab = logits.shape[-1]
        top, order = logits.topk(width, dim=-1) if width < vocab else \
            logits.sort(dim=-1, descending=True)
        ranks = torch.arange(width, device=logits.device)
        top.masked_fill_(ranks >= params[:, TOP_K, None], -float("inf"))
        if use_p:
            top_p = params[:, TOP_P, None]
            probs = top.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs
            # rows with top_p 1 keep all, also where the float32 sum rounds up to 1
            top.masked_fill_((before >= top_p) & (top_p < 1), -float("inf"))
        kept = torch.full_like(logits, -float("inf")).scatter_(-1, order, top)
        if width == vocab:
            return kept
        # rows without top-k keep every token, also those past the `width`
        return torch.where((params[:, TOP_K] < vocab)[:, None], kept, logits)

    def token_logprobs(self, logits: torch.Tensor, targets: list[int],
                       top_n: int) -> list[TokenLogprob]:
        """Logprobs of given tokens (row i scored against targets[i]) with top_n alternatives."""
        raw = torch.log_softmax(logits[:, : self.vocab_size].float(), dim=-1)
        return score(raw, targets, [top_n] * len(targets))


def logprobs_of(raw: torch.Tensor | None, tokens: list[int],
                want: list[int | None]) -> list[TokenLogprob | None]:
    """Per row: (token, its logprob, the top `want` alternatives); None where not wanted."""
    if raw is None:
        return [None] * len(tokens)
    scored = score(raw, tokens, [w or 0 for w in want])
    return [lp if w is not None else None for lp, w in zip(scored, want, strict=True)]


def score(raw: torch.Tensor, tokens: list[int], top_n: list[int]) -> list[TokenLogprob]:
    """Each row's chosen-token logprob and its top_n[i] alternatives."""
    chosen = raw.gather(1, torch.tensor(tokens, device=raw.device)[:, None]).squeeze(1)
    chosen_list: list[float] = chosen.tolist()
    k = max(top_n, default=0)
    top_ids: list[list[int]] = [[] for _ in tokens]
    top_vals: list[list[float]] = [[] for _ in tokens]
    if k:
        vals, ids = raw.topk(k, dim=-1)
        top_ids, top_vals = ids.tolist(), vals.tolist()
    return [(token, lp, list(zip(top_ids[i][:n], top_vals[i][:n], strict=True)))
            for i, (token, lp, n) in enumerate(zip(tokens, chosen_list, top_n, strict=True))]
