"""Our Triton kernels, one per module, each with its launcher; device code only (torch, triton).

paged_decode, paged_prefill, kv_write, rms_norm, rope, silu_mul; their PyTorch references are
`reference.py` and the RoPE cos/sin cache is `rope_cache.py`, both torch only, so the CPU engine
uses them without importing Triton. `workers/engine/triton_backend.py` wraps the kernels as the
`triton` and `flash` attention backends. Without CUDA the kernels run only under Triton's
interpreter (`TRITON_INTERPRET=1`, set before triton is first imported).
"""
