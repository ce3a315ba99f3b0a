"""The engine core: paged KV cache, continuous batching, sampling, detokenizing.

Runs alone (`LLM.generate`) or behind `AsyncLLMEngine`; imports neither Ray nor FastAPI, and
Triton only when a Triton attention backend is chosen.
"""
