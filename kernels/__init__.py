"""Our Triton kernels, one per module, each with its launcher and PyTorch reference.

paged_decode, paged_prefill, kv_write, rms_norm, rope (+ the cos/sin cache), silu_mul;
backend.py wraps them as the `triton` and `flash` attention backends. Without CUDA they run
only under Triton's interpreter (`TRITON_INTERPRET=1`, set before triton is first imported).
"""
