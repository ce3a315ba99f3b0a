"""What k8s/ promises for running Pagoda: scrape targets, the Grafana dashboard, alert rules on
real metric names, readiness, graceful shutdown and the disruption budget of the GPU workers."""
from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import time
from pathlib import Path

import promql_parser
import pytest
import yaml
from k8s_manifests import (
    ROOT,
    env_var,
    exported_names,
    of_kind,
    pod_groups,
    ray_container,
    ray_pods,
    rayservices,
    selects,
    serve_args,
)

from app.middleware import CLIENT_CLOSED, OPEN_PATHS
from tools.grafana_configmap import CONFIGMAP, DASHBOARD, render
from workers.replica.deployment import ModelReplica

IDS = {"ids": lambda v: v if isinstance(v, str) else ""}


def selected(selector: dict) -> list[tuple[str, dict, dict]]:
    return [pod for pod in ray_pods() if selects(selector, pod[1])]


def port_names(group: dict) -> set[str]:
    return {p["name"] for p in ray_container(group).get("ports", [])}


def test_ray_metrics_are_scraped_on_every_ray_pod_and_the_ingress_on_workers():
    monitors = {d["metadata"]["name"]: d["spec"] for _, d in of_kind("PodMonitor")}
    ray = monitors["pagoda-ray"]
    assert {g for g, _, _ in selected(ray["selector"])} == {g for g, _, _ in ray_pods()}
    for group_name, _, group in ray_pods():
        assert "metrics" in port_names(group), group_name
        metrics_port = group["rayStartParams"]["metrics-export-port"]
        assert {p["containerPort"] for p in ray_container(group)["ports"]
                if p["name"] == "metrics"} == {int(metrics_port)}
    assert {e["port"] for e in ray["podMetricsEndpoints"]} >= {"metrics"}
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    for _name, _, group in selected({"matchLabels": {"ray.io/node-type": "head"}}):
        ports = {p["name"]: p["containerPort"] for p in ray_container(group)["ports"]}
        assert ports["as-metrics"] == AUTOSCALER_METRIC_PORT
        assert ports["dash-metrics"] == DASHBOARD_METRIC_PORT
    ingress = monitors["pagoda-ingress"]
    workers = selected(ingress["selector"])
    assert workers and all(labels["ray.io/node-type"] == "worker" for _, labels, _ in workers)
    assert {g for g, _, _ in workers} == {g for g, _, _ in ray_pods() if g != "head"}
    [endpoint] = ingress["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["path"] in OPEN_PATHS  # no key needed
    assert all(endpoint["port"] in port_names(group) for _, _, group in workers)


def test_grafana_configmap_is_the_dashboard():
    assert CONFIGMAP.read_text() == render(DASHBOARD.read_text()), \
        "run `python tools/grafana_configmap.py`"
    [(_, configmap)] = [(n, d) for n, d in of_kind("ConfigMap")
                        if d["metadata"]["name"] == "pagoda-grafana-dashboard"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["pagoda.json"]) == json.loads(DASHBOARD.read_text())
    # kubectl apply keeps a copy in an annotation, which is limited to 256 KiB
    assert len(CONFIGMAP.read_bytes()) < 200 * 1024


@pytest.mark.parametrize("name,doc", rayservices(), **IDS)
def test_the_ray_dashboard_finds_prometheus_and_grafana(name, doc):
    head = ray_container(doc["spec"]["rayClusterConfig"]["headGroupSpec"])
    readme = (ROOT / "README.md").read_text()
    for variable in ("RAY_PROMETHEUS_HOST", "RAY_GRAFANA_HOST", "RAY_GRAFANA_IFRAME_HOST"):
        value = env_var(head, variable)["value"]
        assert re.fullmatch(r"http://[\w.-]+:\d+", value), value
        assert variable in readme


def serve_metric_names() -> set[str]:
    """Ray Serve's own metrics the alerts use, as this Ray version's source names them."""
    from ray.serve._private import deployment_state

    source = inspect.getsource(deployment_state)
    assert '"serve_deployment_replica_healthy"' in source
    assert '{"deployment": self._id.name, "application": self._id.app_name}' in source
    return {"ray_serve_deployment_replica_healthy"}


def alert_rules() -> list[dict]:
    return [rule for _, doc in of_kind("PrometheusRule") for group in doc["spec"]["groups"]
            for rule in group["rules"]]


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    found = []

    def visit(node) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def test_alert_expressions_parse_and_use_exported_metrics():
    known = exported_names() | serve_metric_names()
    for rule in alert_rules():
        used = {s.name for s in selectors(rule["expr"])}
        assert used and used <= known, (rule["alert"], sorted(used - known))
        promql_parser.parse_duration(rule["for"])


def test_the_alerts_the_issue_asks_for():
    rules = {r["alert"]: r for r in alert_rules()}
    assert set(rules) >= {"PagodaNoHealthyReplica", "PagodaKVCacheNearlyFull",
                          "PagodaTimeToFirstTokenHigh", "PagodaServerErrors"}
    apps = {app["name"] for _, doc in rayservices()
            for app in yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]}
    healthy = selectors(rules["PagodaNoHealthyReplica"]["expr"])
    for selector in healthy:
        matchers = {m.name: m.value for m in selector.matchers.matchers}
        assert matchers["application"] in apps
        assert matchers["deployment"] == ModelReplica.name
    kv = rules["PagodaKVCacheNearlyFull"]
    assert promql_parser.parse_duration(kv["for"]).total_seconds() == 300
    assert re.search(r"> 0\.9\b", kv["expr"])
    errors = rules["PagodaServerErrors"]["expr"]
    [status] = {m.value for s in selectors(errors) for m in s.matchers.matchers
                if m.name == "status"}
    # server faults count; a client that went away does not
    assert re.fullmatch(status, "503") and not re.fullmatch(status, str(CLIENT_CLOSED))


@pytest.mark.parametrize("name,doc", rayservices(), **IDS)
def test_workers_are_ready_only_when_serve_routes_to_a_loaded_app(name, doc):
    assert "/health" in OPEN_PATHS
    for group_name, group in pod_groups(doc)[1:]:
        probe = " ".join(ray_container(group)["readinessProbe"]["exec"]["command"])
        for url in ("localhost:52365/api/local_raylet_healthz", "localhost:8000/-/healthz",
                    "localhost:8000/health"):
            assert url in probe, (group_name, url)
        assert "/health" not in " ".join(ray_container(group)["livenessProbe"]["exec"]["command"])


def prestop(group: dict) -> str:
    return ray_container(group)["lifecycle"]["preStop"]["exec"]["command"][-1]


@pytest.mark.parametrize("name,doc", rayservices(), **IDS)
def test_workers_drain_before_they_stop(name, doc):
    grace = max(args.replicas.graceful_shutdown_timeout_s for args in serve_args(doc))
    assert doc["spec"]["rayClusterDeletionDelaySeconds"] > grace
    for group_name, group in pod_groups(doc)[1:]:
        deadline = int(env_var(ray_container(group), "PAGODA_DRAIN_DEADLINE_S")["value"])
        assert grace < deadline < group["template"]["spec"]["terminationGracePeriodSeconds"]
        assert prestop(group).startswith("ray drain-node "), group_name


def test_prestop_waits_for_replicas_up_to_its_deadline(tmp_path):
    group = pod_groups(rayservices()[0][1])[1][1]
    fake_ray = tmp_path / "ray"
    fake_ray.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "drain-args"}\n')
    fake_ray.chmod(0o755)
    title = "ray::ServeReplica:pagoda:ModelReplica"  # Ray's process title of a Serve replica
    replica = subprocess.Popen(["bash", "-c", f"exec -a {title} sleep 60"])
    try:
        cmdline = Path(f"/proc/{replica.pid}/cmdline")
        while not cmdline.read_bytes().startswith(title.encode()):  # until bash has exec'd
            time.sleep(0.05)
        env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}",
               "PAGODA_DRAIN_DEADLINE_S": "2"}
        start = time.monotonic()
        subprocess.run(["bash", "-c", prestop(group)], env=env, check=True, timeout=60)
        assert time.monotonic() - start >= 2  # it waited for the replica, then gave up
    finally:
        replica.kill()
        replica.wait()
    args = (tmp_path / "drain-args").read_text().split()
    assert args[:3] == ["drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION"]
    assert args[-2:] == ["--deadline-remaining-seconds", "2"]


def test_disruption_budget_covers_the_gpu_workers_only():
    [(_, budget)] = of_kind("PodDisruptionBudget")
    chosen = {g for g, _, _ in selected(budget["spec"]["selector"])}
    assert chosen == {g for g, _, _ in ray_pods() if g != "head"}
    assert budget["spec"]["maxUnavailable"] == 1
