"""Every manifest in k8s/ and the schemas it is checked against."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import yaml

from app.serve_args import PagodaArgs

ROOT = Path(__file__).resolve().parents[2]
# ../shared holds the CRD on developer machines and in CI; a clone elsewhere can point at it
SHARED = Path(os.environ.get("PAGODA_SHARED", ROOT.parent / "shared"))
KUBERAY = SHARED / "kuberay"
K8S = ROOT / "k8s"
MANIFESTS = sorted([*K8S.glob("*.yaml"), *K8S.glob("*.yml")])
SERVE_CONFIGS = sorted((ROOT / "deploy").glob("config*.yaml"))


@functools.cache
def documents() -> list[tuple[str, dict]]:
    """(`file#index`, document) for every non-empty YAML document in k8s/; do not edit them."""
    docs = []
    for path in MANIFESTS:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                docs.append((f"{path.name}#{i}", doc))
    return docs


def of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in documents() if doc.get("kind") == kind]


def rayservices() -> list[tuple[str, dict]]:
    return of_kind("RayService")


@functools.cache
def kuberay_schema(kind: str) -> dict:
    """openAPIV3Schema of the storage version of KubeRay's CRD for `kind`."""
    if not KUBERAY.exists():
        pytest.skip(f"the KubeRay CRDs are not at {KUBERAY}; "
                    "set PAGODA_SHARED to the shared folder")
    path = KUBERAY / f"ray.io_{kind.lower()}s.yaml"
    assert path.exists(), f"no KubeRay CRD for {kind} in {KUBERAY}"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["storage"])
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Keys the API server would silently prune: absent from a closed `properties` schema."""
    found = []
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields")
        for key, item in value.items():
            if props is not None and key in props:
                found += unknown_fields(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, f"{path}.{key}")
            elif props is not None and not preserve and path != ".metadata":
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def pod_groups(rayservice: dict) -> list[tuple[str, dict]]:
    """(group name, group spec) for the head ("head") and every worker group."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])]
    return groups + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]


def pod_labels(group_name: str, group: dict) -> dict:
    """The labels KubeRay puts on a group's pods: the template's and its own node type."""
    node_type = "head" if group_name == "head" else "worker"
    return {**group["template"]["metadata"].get("labels", {}), "ray.io/node-type": node_type}


def ray_pods() -> list[tuple[str, dict, dict]]:
    """(group name, pod labels, group spec) of every group of every RayService."""
    return [(group_name, pod_labels(group_name, group), group) for _, doc in rayservices()
            for group_name, group in pod_groups(doc)]


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first one


def serve_args(rayservice: dict) -> list[PagodaArgs]:
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    return [PagodaArgs.model_validate(app.get("args") or {}) for app in config["applications"]]


def ranks(args: PagodaArgs) -> int:
    """Devices one replica spans: its tensor-parallel times pipeline-parallel ranks."""
    engine = args.engine
    return (getattr(engine, "tensor_parallel_size", None) or 1) * \
        (getattr(engine, "pipeline_parallel_size", None) or 1)


def ranks_per_node(args: PagodaArgs) -> int:
    """Ranks of one replica that share a node: all of them unless pipeline stages may spread."""
    strategy = getattr(args.replicas, "placement_strategy", None)
    if strategy in ("PACK", "SPREAD", "STRICT_SPREAD"):
        return getattr(args.engine, "tensor_parallel_size", None) or 1
    return ranks(args)


def env_var(container: dict, name: str) -> dict | None:
    return next((e for e in container.get("env", []) if e["name"] == name), None)


def exported_names() -> set[str]:
    """Every sample name Prometheus scrapes from the ingress and, via Ray, the replicas."""
    from ray.util import metrics as ray_metrics

    from app.metrics import Metrics
    from workers.replica.metrics import ReplicaMetrics

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    names = {family.name + s for family in Metrics("m").registry.collect()
             for s in suffixes[family.type]}
    kinds = {ray_metrics.Counter: "counter", ray_metrics.Histogram: "histogram",
             ray_metrics.Gauge: "gauge"}
    for metric in vars(ReplicaMetrics("m", "r")).values():
        if type(metric) in kinds:
            names |= {"ray_" + metric._name + s for s in suffixes[kinds[type(metric)]]}
    return names
