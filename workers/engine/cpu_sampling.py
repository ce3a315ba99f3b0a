"""Sampling on a CPU in one call: the C++ extension (cpu_sampling.cpp).

`load().sample(logits, params, draws)` gives one token per row (its argmax where its
temperature is 0): logits float32 [rows, vocab], params the rows of `SamplingRows`
[rows, 4], draws in (0, 1] [rows].

PyTorch finds top-p's nucleus by sorting each row of the vocabulary (about 2 ms a row of 49k
on this CPU) and draws from the kept tokens in several more passes; the extension finds the
top-k, top-p and min-p cuts without sorting the row (see the source) and draws in a few passes
over it. `make install` builds it ahead of time (`python -m workers.engine.cpu_sampling`);
where it cannot build, `load()` returns None and the sampler keeps its PyTorch path.
"""
from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

from workers.engine import cpu_extension

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_sampling.cpp")
NAME = "pagoda_cpu_sampling"
FLAGS = ["-fno-trapping-math"]  # or gcc leaves the exp loop (floats to ints) scalar


@functools.cache
def load() -> ModuleType | None:
    """The compiled extension, building it if needed; None where it cannot be built."""
    return cpu_extension.try_build(NAME, SOURCE, "CPU sampling", FLAGS)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(f"CPU sampling: {'built' if load() else 'unavailable'}")
