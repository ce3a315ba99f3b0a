"""Writes k8s/grafana-dashboard.yaml: deploy/grafana/pagoda.json as a ConfigMap for Grafana's
sidecar.

Run it after changing the dashboard; tests/serve/test_manifests.py fails while the two differ.
`python tools/grafana_configmap.py`
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "pagoda.json"
CONFIGMAP = ROOT / "k8s" / "grafana-dashboard.yaml"

HEADER = """\
# Generated from deploy/grafana/pagoda.json by tools/grafana_configmap.py; do not edit.
# kube-prometheus-stack's Grafana sidecar loads ConfigMaps labelled grafana_dashboard: "1"
# (with grafana.sidecar.dashboards.searchNamespace: ALL when Pagoda runs in another namespace).
apiVersion: v1
kind: ConfigMap
metadata:
  name: pagoda-grafana-dashboard
  labels:
    app.kubernetes.io/name: pagoda
    grafana_dashboard: "1"
data:
  pagoda.json: |
"""


def render(dashboard: str) -> str:
    if not dashboard.endswith("\n") or dashboard.endswith("\n\n"):
        dashboard = dashboard.rstrip("\n") + "\n"  # a block scalar keeps exactly one newline
    return HEADER + "".join(f"    {line}\n" if line else "\n"
                            for line in dashboard.splitlines())


def main() -> None:
    CONFIGMAP.write_text(render(DASHBOARD.read_text()))
    print(f"wrote {CONFIGMAP.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
