"""Parsers of generated text: tool calls and reasoning, split out of the streamed deltas."""
