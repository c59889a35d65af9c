"""Offline tooling for the deployment tests: a real Helm engine, Kubernetes schemas, kustomize.

- Helm: `helm-python-sdk` embeds Helm v4's Go engine (lint, render, values schema checks) as a
  shared library; no helm binary, no cluster.
- Kubernetes schemas: the JSON schemas shipped in `kubernetes-validate` (one set per minor version),
  loaded once per kind so a few hundred manifests validate in well under a second.
- CRDs: KubeRay's RayService schema (tests/deploy/schemas/) kept in the repo as data.
- kustomize: `kubectl kustomize` (kubectl ships kustomize), skipped with a reason when absent.
"""
from __future__ import annotations

import copy
import functools
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "inference-stack"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
K8S = REPO / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
RELEASE = "inference-stack"
NAMESPACE = "inference"
# Oldest the chart supports (Chart.yaml kubeVersion) and the newest the validator knows.
KUBE_VERSIONS = ("1.29.0", "1.37.0")


@dataclass(slots=True, frozen=True)
class Manifest:
    source: str            # template path or file the document came from
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.doc["kind"]

    @property
    def name(self) -> str:
        return self.doc["metadata"]["name"]

    def __str__(self) -> str:
        return f"{self.kind}/{self.name} ({self.source})"


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's values merge: maps merge key by key, everything else (lists too) replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def lint(values: dict[str, Any] | None = None, strict: bool = False) -> dict[str, Any]:
    import helm_python  # noqa: PLC0415  (a 75 MB native library: load it only where used)
    return helm_python.lint(str(CHART), values, strict=strict, namespace=NAMESPACE, kube_version="v1.33.0")


def render(values: dict[str, Any] | None = None) -> list[Manifest]:
    """Every document `helm install` would send, as dicts; raises helm_python errors on failure.
    Each distinct values dict renders once per session; callers get their own copy."""
    return copy.deepcopy(_render(json.dumps(values or {}, sort_keys=True)))


@functools.lru_cache(maxsize=None)
def _render(values_json: str) -> list[Manifest]:
    import helm_python  # noqa: PLC0415
    with helm_python.Chart.load(str(CHART)) as chart:
        files = chart.render(json.loads(values_json), name=RELEASE, namespace=NAMESPACE, is_install=True)
    out: list[Manifest] = []
    for path, text in sorted(files.items()):
        if not path.endswith((".yaml", ".yml")):
            continue        # NOTES.txt
        out.extend(Manifest(path, d) for d in yaml.safe_load_all(text) if d)
    return out


@functools.lru_cache(maxsize=None)
def _kustomize_text(directory: Path) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        import pytest  # noqa: PLC0415
        pytest.skip("kubectl (which ships kustomize) is not installed: apt-get install kubernetes-client (Debian) or kubectl")
    proc = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{proc.stderr}")
    return proc.stdout


def kustomize(directory: Path) -> list[Manifest]:
    """`kubectl kustomize DIR`, parsed (run once per directory and test session)."""
    text = _kustomize_text(directory)
    return [Manifest(str(directory.relative_to(REPO)), d) for d in yaml.safe_load_all(text) if d]


def _schema_dir(version: str) -> Path:
    import kubernetes_validate  # noqa: PLC0415
    return Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{version}-local-strict"


@functools.lru_cache(maxsize=None)
def _k8s_validator(version: str, filename: str) -> jsonschema.protocols.Validator:
    from referencing import Registry, Resource  # noqa: PLC0415
    d = _schema_dir(version)
    path = d / filename
    if not path.is_file():
        raise LookupError(f"no Kubernetes {version} schema {filename}")
    schema = json.loads(path.read_text())
    # Both files carry their own $id (https://kubernetes.io/api/...); refs resolve against them.
    registry = Resource.from_contents(_definitions(version)) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


@functools.lru_cache(maxsize=None)
def _definitions(version: str) -> dict[str, Any]:
    return json.loads((_schema_dir(version) / "_definitions.json").read_text())


def k8s_schema_file(doc: dict[str, Any]) -> str:
    """kubernetes-validate's file naming: <kind>-<group without domain>-<version>.json."""
    api = doc["apiVersion"]
    group, _, ver = api.rpartition("/")
    group = group.split(".")[0]
    return f"{doc['kind'].lower()}-{group + '-' if group else ''}{ver}.json"


def k8s_errors(doc: dict[str, Any], version: str) -> list[str]:
    """Schema errors of a built-in kind against Kubernetes `version` (strict: no unknown fields)."""
    v = _k8s_validator(version, k8s_schema_file(doc))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in v.iter_errors(doc)]


def pod_template_errors(template: dict[str, Any], version: str) -> list[str]:
    v = _k8s_validator(version, "podtemplatespec-v1.json")
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(template)]


def is_builtin(doc: dict[str, Any], version: str = KUBE_VERSIONS[-1]) -> bool:
    return (_schema_dir(version) / k8s_schema_file(doc)).is_file()


@functools.lru_cache(maxsize=None)
def crd_schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Errors of a custom resource against the CRD schema kept in tests/deploy/schemas/."""
    files = {("ray.io/v1", "RayService"): "rayservice.ray.io_v1.json",
             ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com_v1.json"}
    key = (doc["apiVersion"], doc["kind"])
    if key not in files:
        return [f"no CRD schema in tests/deploy/schemas for {key}: add one"]
    v = jsonschema.Draft202012Validator(crd_schema(files[key]))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in v.iter_errors(doc)]


def ray_pod_templates(rayservice: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    out = [("head", cluster["headGroupSpec"]["template"])]
    out += [(f"worker:{g['groupName']}", g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    return out


def pod_specs(m: Manifest) -> list[tuple[str, dict[str, Any]]]:
    """(label, PodSpec) of every pod a manifest makes, RayService groups included."""
    d = m.doc
    if d["kind"] == "RayService":
        return [(f"{m}:{g}", t["spec"]) for g, t in ray_pod_templates(d)]
    if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [(str(m), d["spec"]["template"]["spec"])]
    return []


def validate_all(manifests: list[Manifest]) -> list[str]:
    """Every error of every manifest: built-in kinds against each Kubernetes version in
    KUBE_VERSIONS, custom resources against their CRD schemas, RayService pod templates against
    core/v1 PodTemplateSpec."""
    errors: list[str] = []
    for m in manifests:
        if is_builtin(m.doc):
            for version in KUBE_VERSIONS:
                errors += [f"{m} @k8s {version}: {e}" for e in k8s_errors(m.doc, version)]
        else:
            errors += [f"{m} @CRD: {e}" for e in crd_errors(m.doc)]
        if m.kind == "RayService":
            for group, tmpl in ray_pod_templates(m.doc):
                for version in KUBE_VERSIONS:
                    errors += [f"{m} {group} @PodTemplateSpec {version}: {e}"
                               for e in pod_template_errors(tmpl, version)]
    return errors
