"""What k8s/ promises an operator: keys from Secrets, Ray's token on, the dashboard closed to
the network, non-root pods with a read-only model volume, and the cluster's resources."""
from __future__ import annotations

import re

import pytest
from k8s_manifests import (
    ROOT,
    documents,
    env_var,
    of_kind,
    pod_groups,
    ranks,
    ray_container,
    ray_pods,
    rayservices,
    selects,
    serve_args,
)

IDS = {"ids": lambda v: v if isinstance(v, str) else ""}
SERVE_PORT = 8000
# Ray's ports that run code or hold cluster state: GCS, dashboard (job API), client, metrics,
# dashboard agent
INTERNAL_PORTS = (6379, 8265, 10001, 8080, 52365)
OPERATOR = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
            "namespaceSelector": {}}
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
# parameters of the models our GPU configs serve (weights sized as bf16/fp16)
PARAMETERS = {"Llama-3.1-8B": 8.03e9, "Llama-3.1-70B": 70.6e9}
BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(text: str | int) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|m)?", str(text))
    assert match, text
    number, unit = float(match.group(1)), match.group(2)
    return number / 1000 if unit == "m" else number * BINARY.get(unit, 1)


@pytest.mark.parametrize("name,doc", rayservices(), **IDS)
def test_every_ray_pod_reads_the_api_key_from_a_secret(name, doc):
    for group_name, group in pod_groups(doc):
        env = env_var(ray_container(group), "PAGODA_API_KEY")
        assert env and "value" not in env, group_name
        ref = env["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("pagoda-api-key", "api-key")
        assert not ref.get("optional"), "a missing Secret must stop the pod, not open the API"


def test_no_secret_values_are_committed():
    assert of_kind("Secret") == []
    for name, doc in documents():
        text = repr(doc)
        assert not re.search(r"'name': '\w*(KEY|TOKEN|PASSWORD)\w*', 'value'", text), name


@pytest.mark.parametrize("name,doc", rayservices(), **IDS)
def test_ray_token_authentication_is_on(name, doc):
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "pagoda-ray-token"}
    major, minor, _ = (int(x) for x in cluster["rayVersion"].split("."))
    assert (major, minor) >= (2, 52), "KubeRay needs Ray 2.52 for token authentication"
    for _, group in pod_groups(doc):
        for container in group["template"]["spec"]["containers"]:
            assert env_var(container, "RAY_AUTH_MODE") is None  # KubeRay sets it from authOptions


def test_nothing_exposes_the_cluster_outside_kubernetes():
    for name, doc in documents():
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", name
        assert doc["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), name
    for name, doc in rayservices():
        assert doc["spec"]["serveService"]["spec"]["type"] == "ClusterIP"
        head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"
        assert not head.get("enableIngress"), name


def allowed_peers(port: int, labels: dict) -> list[dict | None]:
    """Peers the NetworkPolicies let reach `port` of a pod with `labels`; None means anyone."""
    peers: list[dict | None] = []
    policies = [d for _, d in of_kind("NetworkPolicy") if selects(d["spec"]["podSelector"], labels)]
    assert policies, f"no NetworkPolicy selects pods labelled {labels}"
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            peers += rule.get("from", [None])
    return peers


def test_network_policy_opens_only_the_serve_port_to_clients():
    for group_name, labels, _ in ray_pods():
        own = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": labels[
            "app.kubernetes.io/name"]}}}
        assert None in allowed_peers(SERVE_PORT, labels), group_name
        for port in INTERNAL_PORTS:
            peers = allowed_peers(port, labels)
            assert own in peers and None not in peers, (group_name, port)
            assert all(p in (own, OPERATOR, MONITORING) for p in peers), (group_name, port)
        assert MONITORING in allowed_peers(8080, labels)
        assert OPERATOR in allowed_peers(8265, labels)  # it deploys serveConfigV2 there
        for port in (6379, 10001):
            assert allowed_peers(port, labels) == [own], (group_name, port)


@pytest.mark.parametrize("name,doc", rayservices(), **IDS)
def test_pods_run_as_the_images_non_root_user(name, doc):
    dockerfile = (ROOT / "k8s" / "Dockerfile").read_text()
    user, group = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)[-1]
    assert int(user) != 0
    for group_name, pod in pod_groups(doc):
        spec = pod["template"]["spec"]
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True, group_name
        assert (context["runAsUser"], context["runAsGroup"]) == (int(user), int(group))
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    autoscaler = doc["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
    assert autoscaler["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("name,doc", rayservices(), **IDS)
def test_the_model_volume_is_read_only(name, doc):
    models = [args.engine.model for args in serve_args(doc)]
    for group_name, group in pod_groups(doc)[1:]:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        for mount in ray_container(group)["volumeMounts"]:
            if any(m.startswith(mount["mountPath"].rstrip("/") + "/") for m in models):
                assert mount.get("readOnly") is True, (group_name, mount)
                claim = volumes[mount["name"]].get("persistentVolumeClaim")
                assert claim is None or claim.get("readOnly") is True, group_name


@pytest.mark.parametrize("name,doc", rayservices(), **IDS)
def test_worker_resources_match_the_engine_config(name, doc):
    for args in serve_args(doc):
        model = next(k for k in PARAMETERS if k in args.engine.model_name)
        assert args.engine.dtype in ("bfloat16", "float16")
        # each rank holds its share of the weights and kv_cache_memory_gb of KV cache
        weights = PARAMETERS[model] * 2 / ranks(args)
        per_gpu = weights + (args.engine.kv_cache_memory_gb or 0) * 2**30 + 4 * 2**30
        for group_name, group in pod_groups(doc)[1:]:
            spec, container = group["template"]["spec"], ray_container(group)
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            assert requests == limits, "GPU workers get exactly what they ask for"
            terms = spec["affinity"]["nodeAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            memory = [e for t in terms for e in t["matchExpressions"]
                      if e["key"] == "nvidia.com/gpu.memory"]
            assert memory and memory[0]["operator"] == "Gt", group_name
            assert int(memory[0]["values"][0]) * 2**20 >= per_gpu, (group_name, per_gpu / 2**30)
            shm = next(v for v in spec["volumes"] if v["name"] == "shm")["emptyDir"]
            assert shm["medium"] == "Memory"
            mounted = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounted["/dev/shm"] == "shm"
            object_store = quantity(group["rayStartParams"]["object-store-memory"])
            # the object store lives in /dev/shm; NCCL needs room beside it
            assert object_store + 4 * 2**30 <= quantity(shm["sizeLimit"])
            # a memory-backed emptyDir counts against the container's memory limit
            assert quantity(shm["sizeLimit"]) <= quantity(limits["memory"]) / 2


def test_prometheus_reaches_every_port_it_scrapes():
    for _, monitor in of_kind("PodMonitor"):
        for group_name, labels, group in ray_pods():
            if not selects(monitor["spec"]["selector"], labels):
                continue
            ports = {p["name"]: p["containerPort"] for p in ray_container(group)["ports"]}
            for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                if endpoint["port"] in ports:
                    peers = allowed_peers(ports[endpoint["port"]], labels)
                    assert MONITORING in peers or None in peers, (group_name, endpoint["port"])
