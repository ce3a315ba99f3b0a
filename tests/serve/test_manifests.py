"""k8s/ and deploy/ are valid: the KubeRay CRD schema, Serve's config schema and our args model."""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from app.serve_args import ApiArgs, EngineArgs, PagodaArgs
from app.settings import Settings
from workers.engine.config import EngineConfig

ROOT = Path(__file__).resolve().parents[2]
# ../shared holds the CRD on developer machines and in CI; a clone elsewhere can point at it
SHARED = Path(os.environ.get("PAGODA_SHARED", ROOT.parent / "shared"))
CRD = SHARED / "kuberay" / "ray.io_rayservices.yaml"
MANIFESTS = sorted((ROOT / "k8s").glob("*.yaml"))
SERVE_CONFIGS = [ROOT / "deploy" / "config.yaml", ROOT / "deploy" / "config.gpu.yaml"]


@functools.cache
def rayservice_schema() -> dict:
    if not CRD.exists():
        pytest.skip(f"the KubeRay CRD is not at {CRD}; set PAGODA_SHARED to the shared folder")
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["storage"])
    return version["schema"]["openAPIV3Schema"]


def rayservices() -> list[tuple[str, dict]]:
    docs = []
    for path in MANIFESTS:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc and doc.get("kind") == "RayService":
                docs.append((f"{path.name}#{i}", doc))
    return docs


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


def test_there_is_a_rayservice_manifest():
    assert [name for name, _ in rayservices()] == ["rayservice.yaml#0"]


@pytest.mark.parametrize("name,doc", rayservices(), ids=lambda v: v if isinstance(v, str) else "")
def test_rayservice_matches_the_kuberay_crd(name, doc):
    schema = rayservice_schema()
    jsonschema.Draft7Validator(schema).validate(doc)
    assert unknown_fields(doc, schema) == [], name


def test_the_crd_check_catches_bad_manifests():
    schema = rayservice_schema()
    good = rayservices()[0][1]
    bad_type = yaml.safe_load(yaml.safe_dump(good))
    bad_type["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] = "yes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(bad_type)
    typo = yaml.safe_load(yaml.safe_dump(good))
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert unknown_fields(typo, schema) == [".spec.rayClusterConfig.workerGroupSpecs[0].maxReplica"]


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_configs_parse_against_serve_and_our_args(path):
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    for app in config.applications:
        assert app.import_path == "app.serve_app:build_app"
        PagodaArgs.model_validate(app.args)


def test_serve_config_v2_is_the_gpu_config():
    doc = rayservices()[0][1]
    embedded = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((ROOT / "deploy" / "config.gpu.yaml").read_text())


def test_gpu_replicas_fit_the_gpu_worker_group():
    doc = rayservices()[0][1]
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    args = PagodaArgs.model_validate(
        yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"])
    assert args.replicas.num_gpus == 1 and args.engine.device == "cuda"
    group = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
    container = group["template"]["spec"]["containers"][0]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1
    # one replica per GPU, so the group must be able to grow to max_replicas GPUs
    assert group["maxReplicas"] * gpus >= args.replicas.max_replicas
    cpus = int(container["resources"]["limits"]["cpu"])
    assert cpus >= args.replicas.num_cpus
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_model_folder_is_on_a_mounted_volume_of_the_gpu_workers():
    doc = rayservices()[0][1]
    args = PagodaArgs.model_validate(
        yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"])
    for group in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        volumes = {v["name"] for v in spec["volumes"]}
        mounts = spec["containers"][0]["volumeMounts"]
        assert {m["name"] for m in mounts} <= volumes
        assert any(args.model.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts)
        assert all(c.get("readinessProbe") and c.get("livenessProbe")
                   for c in spec["containers"])


def test_cpu_config_fits_two_cores():
    args = PagodaArgs.model_validate(
        yaml.safe_load(SERVE_CONFIGS[0].read_text())["applications"][0]["args"])
    assert (args.replicas.min_replicas, args.replicas.max_replicas) == (1, 2)
    assert args.replicas.num_gpus == 0
    needed = args.replicas.max_replicas * args.replicas.num_cpus \
        + args.ingress.num_replicas * args.ingress.num_cpus
    assert needed <= 2
    assert os.path.normpath(args.model) == "models/smollm2-135m-instruct"


def test_engine_and_api_args_name_real_config_fields():
    assert set(EngineArgs.model_fields) <= {f.name for f in dataclasses.fields(EngineConfig)}
    assert set(ApiArgs.model_fields) <= {f.name for f in dataclasses.fields(Settings)}


def test_args_reject_typos_and_bad_bounds():
    with pytest.raises(ValueError):
        PagodaArgs.model_validate({"engine": {"max_num_seq": 4}})
    with pytest.raises(ValueError):
        PagodaArgs.model_validate({"replicas": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ValueError):
        PagodaArgs.model_validate({"routing": {"min_prefix_blocks": 0}})


def test_dockerfile_copies_existing_paths():
    text = (ROOT / "k8s" / "Dockerfile").read_text()
    copies = re.finditer(r"^COPY (?:--\S+ )*(\S+) ", text, re.MULTILINE)
    sources = [m.group(1) for m in copies]
    assert "requirements.txt" in sources and "workers" in sources and "app" in sources
    for source in sources:
        assert (ROOT / source).exists(), source


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


def test_grafana_dashboard_charts_only_exported_metrics():
    import json

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "pagoda.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\b(?:ray_)?pagoda_\w+", e)}
    known = exported_names()
    assert used and used <= known, sorted(used - known)
    for required in ("time_to_first_token", "inter_token_latency", "e2e", "queue_time",
                     "num_running", "num_waiting", "kv_usage", "prefix_cache", "preemptions",
                     "prompt_tokens", "generation_tokens", "requests_total"):
        assert any(required in name for name in used), required


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_builder_turns_args_into_deployment_options(path):
    # Serve's own graph builder, as `serve run` uses it; no cluster needed
    from ray.serve._private.build_app import build_app as build_graph

    from app.serve_app import build_app
    from workers.router.request_router import PagodaRequestRouter

    raw = yaml.safe_load(path.read_text())["applications"][0]["args"]
    args = PagodaArgs.model_validate(raw)
    built = build_graph(build_app(raw), name="pagoda")
    assert built.ingress_deployment_name == "PagodaIngress"
    replica = next(d for d in built.deployments if d.name == "ModelReplica")
    config = replica._deployment_config
    assert replica.ray_actor_options.get("num_gpus", 0) == args.replicas.num_gpus
    assert replica.ray_actor_options["num_cpus"] == args.replicas.num_cpus
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas) \
        == (args.replicas.min_replicas, args.replicas.max_replicas)
    assert config.max_queued_requests == args.replicas.max_queued_requests
    router = config.request_router_config
    assert router.get_request_router_class() is PagodaRequestRouter
    assert router.request_router_kwargs == dataclasses.asdict(args.routing)
