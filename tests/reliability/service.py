"""The service every reliability test shares: its config and the checks of a settled state."""
from __future__ import annotations

import time
from pathlib import Path

import yaml

from tests.serve.conftest import ServeApp

ROOT = Path(__file__).resolve().parents[2]
SERVED = "smollm2-135m-instruct"
FAULT_MARKER = "PAGODA-INJECT-FAULT-7f3a"  # a prompt containing it raises inside the engine
NUM_REPLICAS = 2
MAX_ONGOING = 40  # per replica: 64 streams fit on two replicas with room to spare
MAX_N = 4
SETTLE_TIMEOUT_S = 60  # streams still draining on a slow, busy CI machine


def reliability_config() -> dict:
    """deploy/config.yaml with two pinned replicas and the engine's fault marker set."""
    config = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())
    args = config["applications"][0]["args"]
    # float32: the replica-kill test compares resumed greedy texts with uninterrupted ones, and
    # in bf16 a re-prefill and the decodes it replaces can round a near-tie apart
    args["engine"].update(num_threads=1, max_num_seqs=32, fault_marker=FAULT_MARKER,
                          dtype="float32")
    for autoscaling in ("min_replicas", "max_replicas", "initial_replicas"):
        args["replicas"].pop(autoscaling, None)
    args["replicas"].update(
        num_replicas=NUM_REPLICAS, target_ongoing_requests=16,
        max_ongoing_requests=MAX_ONGOING, max_queued_requests=64,
        graceful_shutdown_timeout_s=5, health_check_period_s=2)
    args["api"] = {"max_n": MAX_N}
    # the drain test changes the replica count through the controller, as an external scaler
    config["applications"][0]["external_scaler_enabled"] = True
    config["logging_config"]["log_level"] = "WARNING"
    return config


def deployment_healthy() -> bool:
    from ray import serve

    status = serve.status().applications.get("pagoda")
    if status is None or status.status != "RUNNING":
        return False
    replica = status.deployments["ModelReplica"]
    return replica.status == "HEALTHY" and \
        replica.replica_states.get("RUNNING", 0) == NUM_REPLICAS


def wait_settled(app: ServeApp, timeout_s: float = SETTLE_TIMEOUT_S) -> dict:
    """Replica loads once both replicas are up, healthy and idle; fails after timeout_s.

    Idle means nothing running or waiting and kv_usage == 0: every KV block back on the free
    list (prefix-cached blocks count as free, they are reusable at once).
    """
    deadline = time.monotonic() + timeout_s
    loads: dict = {}
    while time.monotonic() < deadline:
        snap = app.snapshot()
        loads = dict(snap.loads) if snap else {}
        idle = len(loads) == NUM_REPLICAS and all(
            load.num_running == 0 and load.num_waiting == 0 and load.kv_usage == 0.0
            for load in loads.values())
        if idle and deployment_healthy():
            return loads
        assert app.process.poll() is None, app.log_tail()
        time.sleep(0.5)
    raise AssertionError(f"service did not settle in {timeout_s}s: {loads}")


def request_counts(base_url: str) -> dict[tuple[str, str], float]:
    """The ingress's pagoda_requests_total by (status, finish_reason), over every endpoint."""
    import re

    import httpx

    counts: dict[tuple[str, str], float] = {}
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    for labels, value in re.findall(r"pagoda_requests_total\{([^}]*)\} (\S+)", text):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        key = (fields["status"], fields["finish_reason"])
        counts[key] = counts.get(key, 0.0) + float(value)
    return counts


def ingress_logs() -> list[Path]:
    """Log files of the ingress replica's worker process: Serve's replica log and the
    worker's stdout/stderr, where asyncio reports unretrieved task exceptions."""
    import os

    import ray
    from ray._private.worker import _global_node

    logs = Path(_global_node.get_session_dir_path()) / "logs"
    names = [n for n in ray.util.list_named_actors(all_namespaces=True)
             if "#PagodaIngress#" in n["name"]]
    files = list((logs / "serve").glob("replica_pagoda_PagodaIngress_*.log"))
    for named in names:
        actor = ray.get_actor(named["name"], namespace=named["namespace"])
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
        files += [*logs.glob(f"worker-*-{pid}.err"), *logs.glob(f"worker-*-{pid}.out")]
    return files


def log_sizes(files: list[Path]) -> dict[Path, int]:
    return {f: f.stat().st_size for f in files}


def logged_since(sizes: dict[Path, int]) -> str:
    """What the files in `sizes` gained since their sizes were taken."""
    text = []
    for path, size in sizes.items():
        with open(path, "rb") as f:
            f.seek(size)
            text.append(f.read().decode(errors="replace"))
    return "".join(text)
