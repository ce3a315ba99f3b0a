"""deploy/ configs and the RayServices in k8s/: Serve's config schema, our args, what the GPU
workers offer. tests/serve/test_k8s_schemas.py checks every manifest's schema."""
from __future__ import annotations

import dataclasses
import os
import pickle
import re

import jsonschema
import pytest
import yaml
from k8s_manifests import (
    ROOT,
    SERVE_CONFIGS,
    exported_names,
    kuberay_schema,
    pod_groups,
    ranks,
    ranks_per_node,
    ray_container,
    rayservices,
    serve_args,
    unknown_fields,
)
from ray.serve.schema import ServeDeploySchema

from app.serve_args import PagodaArgs, cpu_plan, machine_cores
from app.settings import Settings
from workers.engine.config import EngineConfig


def test_there_is_a_rayservice_manifest():
    assert "rayservice.yaml#0" in [name for name, _ in rayservices()]


def test_the_crd_check_catches_bad_manifests():
    schema = kuberay_schema("RayService")
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


@pytest.mark.parametrize("name,doc", rayservices(), ids=lambda v: v if isinstance(v, str) else "")
def test_serve_config_v2_is_a_deploy_config_verbatim(name, doc):
    embedded = yaml.safe_load(doc["spec"]["serveConfigV2"])
    configs = {p.name: yaml.safe_load(p.read_text()) for p in SERVE_CONFIGS}
    assert embedded in configs.values(), f"{name}: serveConfigV2 is none of {sorted(configs)}"
    assert embedded != configs["config.yaml"]  # the CPU config is for one box


@pytest.mark.parametrize("name,doc", rayservices(), ids=lambda v: v if isinstance(v, str) else "")
def test_gpu_replicas_fit_the_gpu_worker_groups(name, doc):
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = [g for _, g in pod_groups(doc)[1:]]
    for args in serve_args(doc):
        assert args.replicas.num_gpus >= 1 and args.engine.device == "cuda"
        on_node = ranks_per_node(args)  # ranks placed together need one node's GPUs and CPUs
        cpus = args.replicas.num_cpus + (on_node - 1) * getattr(args.replicas, "worker_num_cpus", 0)
        fitting = []
        for group in groups:
            limits = ray_container(group)["resources"]["limits"]
            gpus = int(limits.get("nvidia.com/gpu", 0))
            if gpus >= on_node * args.replicas.num_gpus and int(limits["cpu"]) >= cpus:
                fitting.append(group["maxReplicas"] * gpus)
        # the autoscaler must be able to grow the cluster to max_replicas replicas' GPUs
        needed = args.replicas.max_replicas * ranks(args) * args.replicas.num_gpus
        assert fitting and max(fitting) >= needed, name


@pytest.mark.parametrize("name,doc", rayservices(), ids=lambda v: v if isinstance(v, str) else "")
def test_model_folder_is_on_a_mounted_volume_of_the_gpu_workers(name, doc):
    models = [args.engine.model for args in serve_args(doc)]
    for group_name, group in pod_groups(doc)[1:]:
        spec = group["template"]["spec"]
        volumes = {v["name"] for v in spec["volumes"]}
        mounts = ray_container(group)["volumeMounts"]
        assert {m["name"] for m in mounts} <= volumes
        for model in models:
            assert any(model.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), \
                (group_name, model)
        assert all(c.get("readinessProbe") and c.get("livenessProbe")
                   for c in spec["containers"])


def test_cpu_config_fits_two_cores():
    args = PagodaArgs.model_validate(
        yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())["applications"][0]["args"])
    plan = cpu_plan(machine_cores())
    assert (args.replicas.min_replicas, args.replicas.max_replicas) == (1, plan.replicas)
    assert args.engine.num_threads == plan.threads
    assert args.replicas.num_gpus == 0
    needed = args.replicas.max_replicas * args.replicas.num_cpus \
        + args.ingress.num_replicas * args.ingress.num_cpus
    assert needed <= 2
    assert os.path.normpath(args.engine.model) == "models/smollm2-135m-instruct"


def test_args_sections_are_the_engine_and_api_configs():
    args = PagodaArgs.model_validate({"model": "/m/llama", "served_model_name": "llama",
                                      "engine": {"block_size": 8}})
    assert isinstance(args.engine, EngineConfig) and args.engine.model == "/m/llama"
    assert args.engine.model_name == "llama" and args.engine.block_size == 8
    assert PagodaArgs.model_validate(args.model_dump(mode="json")) == args
    with pytest.raises(ValueError):  # the key only comes from the environment
        PagodaArgs.model_validate({"api": {"api_key": "secret"}})


def test_settings_take_the_environment_under_the_args(monkeypatch):
    monkeypatch.setenv("PAGODA_MAX_N", "7")
    monkeypatch.setenv("PAGODA_LOG_PROMPTS", "true")
    args = PagodaArgs.model_validate({"api": {"max_n": 3}})
    settings = Settings.of(pickle.loads(pickle.dumps(args)).api)  # as the ingress gets them
    assert (settings.max_n, settings.log_prompts) == (3, True)


def test_args_reject_typos_and_bad_bounds():
    with pytest.raises(ValueError):
        PagodaArgs.model_validate({"engine": {"max_num_seq": 4}})
    with pytest.raises(ValueError):
        PagodaArgs.model_validate({"replicas": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ValueError):
        PagodaArgs.model_validate({"routing": {"min_prefix_blocks": 0}})
    with pytest.raises(ValueError, match="CPU-only"):
        PagodaArgs.model_validate({"engine": {"num_threads": "auto"}, "replicas": {"num_gpus": 1}})


def test_a_fixed_replica_count_turns_autoscaling_off():
    replicas = PagodaArgs.model_validate({"replicas": {"num_replicas": 3}}).replicas
    options = replicas.deployment_options()
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert replicas.max_choices() == 3 * replicas.max_ongoing_requests + \
        replicas.max_queued_requests
    assert "num_replicas" not in PagodaArgs().replicas.deployment_options()


@pytest.mark.parametrize("cores,plan", [(1, (1, 1)), (2, (1, 2)), (3, (1, 2)), (4, (1, 3)),
                                        (9, (1, 8)), (16, (2, 7)), (64, (8, 7))])
def test_cpu_plan_keeps_a_core_for_serving_from_three_cores_and_caps_threads(cores, plan):
    assert cpu_plan(cores) == plan


def test_dockerfile_copies_existing_paths():
    text = (ROOT / "k8s" / "Dockerfile").read_text()
    copies = re.finditer(r"^COPY (?:--\S+ )*(\S+) ", text, re.MULTILINE)
    sources = [m.group(1) for m in copies]
    assert "requirements.txt" in sources and "workers" in sources and "app" in sources
    for source in sources:
        assert (ROOT / source).exists(), source


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
