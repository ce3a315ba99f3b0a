"""A real Ray cluster on loopback with `serve run <config>` as a subprocess, one per module.

A module opts in by defining `serve_config() -> dict` (a deploy config, usually
deploy/config.yaml with some args changed) and using the `serve_app` fixture. The test process
owns the Ray cluster (so it can kill replicas and the tracker) and always shuts it down.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "smollm2-135m-instruct"
APP_NAME = "pagoda"
START_TIMEOUT_S = 300


@dataclass
class ServeApp:
    base_url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def openai(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", **kwargs)

    def snapshot(self):
        """The LoadTracker's view, or None while no replica has created it."""
        import ray

        from workers.tracker.load_tracker import find_tracker

        tracker = find_tracker()
        return None if tracker is None else ray.get(tracker.snapshot.remote(), timeout=10)

    def replica_ids(self) -> list[str]:
        snap = self.snapshot()
        return sorted(snap.loads) if snap else []

    def wait_for_replicas(self, count: int, timeout_s: float = START_TIMEOUT_S) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ids = self.replica_ids()
            if len(ids) == count:
                return ids
            assert self.process.poll() is None, self.log_tail()
            time.sleep(0.5)
        raise TimeoutError(f"expected {count} replicas, have {self.replica_ids()}")

    def replica_actor(self, replica_id: str):
        import ray

        return ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#ModelReplica#{replica_id}",
                             namespace="serve")


def wait_until_ready(app: ServeApp) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if app.process.poll() is not None:
            raise RuntimeError(f"serve run exited early:\n{app.log_tail()}")
        try:
            if httpx.get(f"{app.base_url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"serve app not ready after {START_TIMEOUT_S}s:\n{app.log_tail()}")


@pytest.fixture(scope="module")
def serve_app(request, tmp_path_factory):
    if not (MODEL / "config.json").exists():
        pytest.skip("the default model is missing; run `make model`")
    with launch_serve_app(request.module.serve_config(), tmp_path_factory.mktemp("serve")) as app:
        yield app


@contextlib.contextmanager
def launch_serve_app(config: dict, tmp: Path) -> Iterator[ServeApp]:
    """Starts a local Ray cluster and `serve run` of config on a free loopback port."""
    import ray

    from workers.engine.worker import free_port

    saved_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), saved_path]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    process = None
    try:
        port = free_port()
        config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1",
                                  "port": port}
        config_path = tmp / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        log_path = tmp / "serve.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [str(Path(sys.executable).parent / "serve"), "run", "--address",
                 ray.get_runtime_context().gcs_address, str(config_path)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        app = ServeApp(f"http://127.0.0.1:{port}", process, log_path)
        wait_until_ready(app)
        yield app
    finally:
        if process is not None:
            stop(process)
        ray.shutdown()
        if saved_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_path


def stop(process: subprocess.Popen) -> None:
    """Ctrl-C makes `serve run` shut the app down; its process group is killed if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
