"""What a step hands the sampler: logits of the rows that sample and of prompt-logprob rows.

The last pipeline stage computes them from the final hidden states; when the driver is
another rank, it sends them there as one tensor, which the driver splits again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from workers.engine.distributed import ParallelContext
from workers.engine.model import CausalLM
from workers.engine.scheduler import ScheduledBatch
from workers.engine.sequence import Sequence
from workers.engine.step_plan import StepPlan

EXACT_TOP_LOGITS = 16  # half-precision logits recomputed in fp32, per row


@dataclass
class StepLogits:
    sample: torch.Tensor | None  # [sampling seqs, vocab], in batch order
    prompt: dict[int, torch.Tensor]  # batch index -> logits of its prompt rows this step

    def sampling_seqs(self, batch: ScheduledBatch) -> list[Sequence]:
        """The sequences the rows of `sample` belong to, in order: those the step takes to
        their last known or in-flight token (at most one row each, so all when rows = batch)."""
        if self.sample is None:
            return []
        if self.sample.shape[0] == len(batch):
            return batch.seqs
        return batch.sampling_seqs()

    def packed(self) -> torch.Tensor | None:
        """Every row in one tensor, to send to the driver (`receive_logits` splits it)."""
        parts = ([self.sample] if self.sample is not None else []) + list(self.prompt.values())
        return torch.cat(parts) if parts else None


def step_logits(model: CausalLM, hidden: torch.Tensor, plan: StepPlan,
                ctx: ParallelContext) -> StepLogits | None:
    """The plan's logits from the last stage's hidden states; None on tensor ranks past the
    first, which only join the vocabulary gathers."""
    rows = plan.sample_rows
    if len(rows) == hidden.shape[0]:  # rows increase: every row samples (decodes only)
        sample = compute_logits(model, hidden, ctx)
    else:
        # a list index would be copied to the device synchronously, waiting for this forward
        index = torch.tensor(rows).to(hidden.device, non_blocking=True)
        sample = compute_logits(model, hidden[index], ctx) if rows else None
    prompt = {i: compute_logits(model, hidden[first:first + count], ctx)
              for i, first, count in plan.prompt_rows}
    if ctx.tp_rank != 0:
        return None
    return StepLogits(sample, {i: p for i, p in prompt.items() if p is not None})


def receive_logits(plan: StepPlan, ctx: ParallelContext, vocab_size: int, dtype: torch.dtype,
                   device: torch.device) -> StepLogits:
    """The driver's side of `StepLogits.packed`: the plan's logits from the last stage."""
    counts = [len(plan.sample_rows)] + [count for _, _, count in plan.prompt_rows]
    if not sum(counts):
        return StepLogits(None, {})
    logits = torch.empty(sum(counts), vocab_size, dtype=dtype, device=device)
    dist.recv(logits, ctx.rank_of(ctx.pp_size - 1, 0), group=ctx.device_group)
    sample, *prompt = logits.split(counts)
    return StepLogits(sample if plan.sample_rows else None,
                      {i: p for (i, _, _), p in zip(plan.prompt_rows, prompt, strict=False)})


def compute_logits(model: CausalLM, hidden: torch.Tensor,
                   ctx: ParallelContext) -> torch.Tensor | None:
    logits = model.compute_logits(hidden)
    # tensor-parallel ranks hold a vocabulary shard (None past the gather on rank > 0)
    if logits is None or ctx.world_size > 1 or logits.dtype == torch.float32:
        return logits
    # bf16 keeps 8 bits of mantissa: logits near 20 round to steps of 0.125, enough to
    # swap the top two tokens. The top candidates are recomputed exactly in fp32.
    weight = model.head_weight
    top = logits.topk(min(EXACT_TOP_LOGITS, logits.shape[-1]), dim=-1).indices
    exact = torch.einsum("rd,rkd->rk", hidden.float(), weight[top].float())
    return logits.float().scatter_(1, top, exact)
