"""Ingress: the OpenAI-compatible HTTP API in front of the engine."""
