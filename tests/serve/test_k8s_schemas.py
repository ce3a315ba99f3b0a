"""Every document in k8s/ against its real schema, found by its apiVersion and kind.

- ray.io: KubeRay's CRD in ../shared/kuberay (openAPIV3Schema, plus no pruned keys).
- monitoring.coreos.com: the Prometheus Operator CRD models of cloudcoil-models-prometheus-operator.
- everything else: Kubernetes' own schemas from kubernetes-validate, strict (no unknown keys).
Pod templates inside RayServices are also checked against Kubernetes' PodTemplate schema.
"""
from __future__ import annotations

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as prometheus_operator
from k8s_manifests import documents, kuberay_schema, pod_groups, rayservices, unknown_fields

# the oldest Kubernetes KubeRay 1.5 supports and the newest kubernetes-validate knows
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
IDS = {"ids": lambda v: v if isinstance(v, str) else ""}


def dropped_keys(given, kept, path: str = "") -> list[str]:
    """Keys of `given` that a model validation left out of `kept` (it ignores unknown keys)."""
    if isinstance(given, dict) and isinstance(kept, dict):
        return [f"{path}.{key}" for key in given if key not in kept] + [
            missing for key in given if key in kept
            for missing in dropped_keys(given[key], kept[key], f"{path}.{key}")]
    if isinstance(given, list) and isinstance(kept, list):
        return [missing for i, (a, b) in enumerate(zip(given, kept, strict=True))
                for missing in dropped_keys(a, b, f"{path}[{i}]")]
    return []


def check_prometheus_operator(doc: dict) -> None:
    model = getattr(prometheus_operator, doc["kind"], None)
    assert model is not None, f"no Prometheus Operator model for {doc['kind']}"
    kept = model.model_validate(doc).model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert dropped_keys(doc, kept) == []


def check_kuberay(doc: dict) -> None:
    schema = kuberay_schema(doc["kind"])
    jsonschema.Draft7Validator(schema).validate(doc)
    assert unknown_fields(doc, schema) == []


def check_kubernetes(doc: dict) -> None:
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def check(doc: dict) -> None:
    group = doc["apiVersion"].rpartition("/")[0]
    if group == "ray.io":
        check_kuberay(doc)
    elif group == "monitoring.coreos.com":
        check_prometheus_operator(doc)
    else:
        check_kubernetes(doc)


@pytest.mark.parametrize("name,doc", documents(), **IDS)
def test_manifest_matches_its_schema(name, doc):
    check(doc)


@pytest.mark.parametrize("name,doc", rayservices(), **IDS)
def test_rayservice_pod_templates_match_kubernetes(name, doc):
    for group, spec in pod_groups(doc):
        template = {"apiVersion": "v1", "kind": "PodTemplate",
                    "metadata": {"name": f"{name}-{group}"}, "template": spec["template"]}
        check_kubernetes(template)


def test_there_are_manifests_of_every_kind():
    kinds = {doc["kind"] for _, doc in documents()}
    assert {"RayService", "NetworkPolicy", "PodMonitor", "PrometheusRule", "ConfigMap",
            "PodDisruptionBudget"} <= kinds


def test_each_check_catches_a_bad_manifest():
    def edited(kind: str, edit) -> dict:
        doc = yaml.safe_load(yaml.safe_dump(next(d for _, d in documents() if d["kind"] == kind)))
        edit(doc)
        return doc

    def typo_in_rule(doc):
        rule = doc["spec"]["groups"][0]["rules"][0]
        rule["fro"] = rule.pop("for")

    bad = [
        edited("PrometheusRule", typo_in_rule),
        edited("PodMonitor",
               lambda d: d["spec"]["podMetricsEndpoints"][0].update(interval="often")),
        edited("NetworkPolicy", lambda d: d["spec"].update(podSelectr={})),
        edited("PodDisruptionBudget", lambda d: d["spec"].update(maxUnavailable=[1])),
        edited("RayService", lambda d: d["spec"]["rayClusterConfig"]["authOptions"].update(
            mode="password")),
    ]
    for doc in bad:
        with pytest.raises((AssertionError, ValueError, jsonschema.ValidationError,
                            kubernetes_validate.ValidationError)):
            check(doc)
    template = edited("RayService", lambda d: None)["spec"]["rayClusterConfig"]["headGroupSpec"]
    template["template"]["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        check_kubernetes({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                          "template": template["template"]})
