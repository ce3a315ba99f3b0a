"""One Serve deployment (two replicas) shared by every reliability test in this folder.

Around each test `settled` checks what must hold whatever the test did: every replica idle
with every KV block free, Serve reporting the deployment healthy, and no replica restarted
unless the test killed one on purpose (`@pytest.mark.kills_replica`).
"""
from __future__ import annotations

import pytest

from tests.serve.conftest import MODEL, ServeApp, launch_serve_app

from .service import NUM_REPLICAS, reliability_config, wait_settled


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "kills_replica: the test kills a model replica on purpose")


@pytest.fixture(scope="package")
def service(tmp_path_factory) -> ServeApp:
    if not (MODEL / "config.json").exists():
        pytest.skip("the default model is missing; run `make model`")
    with launch_serve_app(reliability_config(), tmp_path_factory.mktemp("reliability")) as app:
        app.wait_for_replicas(NUM_REPLICAS)
        yield app


@pytest.fixture(autouse=True)
def settled(service, request):
    """Waits for a settled service, runs the test, then requires it settled again."""
    # a replica killed by an earlier test is replaced first (model load on a busy CPU)
    before = wait_settled(service, timeout_s=300)
    yield
    after = wait_settled(service)
    if request.node.get_closest_marker("kills_replica") is None:
        assert set(after) == set(before), "a replica was restarted"
