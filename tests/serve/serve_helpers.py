"""Helpers shared by the Serve end-to-end tests."""
from __future__ import annotations

from collections.abc import Iterator


def skip_to_first_content(lines: Iterator[str]) -> None:
    """Consume SSE lines up to the first chunk that carries content: generation has begun."""
    for line in lines:
        if line.startswith("data: {") and '"content"' in line:
            return
    raise AssertionError("the stream ended before any content")


def running_replicas(deployment: str = "ModelReplica") -> int:
    """Asks this cluster's Serve controller; `serve.status()` would reuse a client cached for
    an earlier module's cluster."""
    import ray
    from ray.serve.schema import ServeInstanceDetails

    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    details = ServeInstanceDetails(**ray.get(controller.get_serve_instance_details.remote()))
    replicas = details.applications["pagoda"].deployments[deployment].replicas
    return sum(replica.state == "RUNNING" for replica in replicas)
