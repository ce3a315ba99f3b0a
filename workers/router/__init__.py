"""Runs in the ingress process: the engine client backed by replicas, and the request router
that picks a replica by prefix-cache hits and load (policy as pure functions)."""
