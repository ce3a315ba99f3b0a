"""Our Triton kernels, one per module, each with its launcher and PyTorch reference.

paged_decode, paged_prefill, kv_write, rms_norm, rope (+ the cos/sin cache), silu_mul;
backend.py wraps them as the `triton` and `flash` attention backends.
"""
from __future__ import annotations

import os
import sys

import torch

# Without CUDA, Triton kernels run only in its interpreter, which Triton fixes when it is first
# imported (its own tl.* helpers included); this package is imported before any kernel module.
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
