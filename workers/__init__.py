"""Model replicas: our own LLM engine (paged KV cache, continuous batching)."""
