"""A step's integer inputs reach the device in one packed copy and come back as their own
tensors, with their shapes and values; consecutive steps never share storage."""
from __future__ import annotations

import pytest
import torch

from workers.engine.input_staging import InputStaging

# on a CPU the packing runs only when forced: there the inputs need no copy at all
DEVICES = ["cpu-packed", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def step_inputs(seed: int, seqs: int, width: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50000, (seqs,), generator=g),  # token ids
            torch.arange(seqs) + seed,  # positions
            torch.randint(0, 1 << 20, (seqs,), generator=g),  # slots
            torch.arange(seqs + 1),  # query starts
            torch.randint(1, 4096, (seqs,), generator=g),  # context lengths
            torch.randint(0, 10000, (seqs, width), generator=g)]  # block tables


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_arrive_whole_and_steps_do_not_share_storage(device):
    staging = InputStaging(torch.device(device.removesuffix("-packed")),
                           pack=True if device.endswith("-packed") else None)
    device = device.removesuffix("-packed")
    steps = [step_inputs(seed, seqs, width)
             for seed, (seqs, width) in enumerate([(4, 2), (64, 9), (3, 1), (256, 130)])]
    results = []
    for parts in steps:
        got = staging.to_device(parts)
        assert [t.device.type for t in got] == [device] * len(parts)
        assert [t.shape for t in got] == [p.shape for p in parts]
        if staging.pack:  # the caller may reuse its host tensors at once
            for part in parts:
                part.fill_(-1)
        results.append(got)
    if device == "cuda":
        torch.cuda.synchronize()
        assert all(b.is_pinned() for b in staging.buffers)
    for seed, got in enumerate(results):  # earlier steps' inputs are intact
        want = step_inputs(seed, got[0].shape[0], got[-1].shape[1])
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g.cpu(), w)
