"""The model-replica process: the Serve deployment around one AsyncLLMEngine, its load reporter
and its Ray metrics."""
