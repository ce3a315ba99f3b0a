"""Output parsers: tool calls per model family and `<think>` reasoning, fed token-text deltas and
giving endpoint-neutral events (`events.py`); `registry.py` picks them for a model."""
