"""The plain manifests (k8s/): up to date with the chart, rendered by `kubectl kustomize`, valid, and
each overlay yields exactly what the chart yields for its example values file."""
from __future__ import annotations

import importlib.util

import pytest

from deploylib import CHART, K8S, kustomize, load_values, render, validate_all

OVERLAYS = {"gpu": "values-gpu.yaml", "dev-cpu": "values-dev-cpu.yaml"}


def normalized(docs: list[dict]) -> dict[tuple[str, str], dict]:
    """Objects keyed by (kind, name), without what only one tool adds: the namespace (kustomize),
    the chart label and the managed-by label (Helm)."""
    out = {}
    for d in docs:
        d = dict(d, metadata=dict(d["metadata"]))
        d["metadata"].pop("namespace", None)
        labels = dict(d["metadata"].get("labels", {}))
        labels.pop("helm.sh/chart", None)
        labels.pop("app.kubernetes.io/managed-by", None)
        if labels:
            d["metadata"]["labels"] = labels
        out[(d["kind"], d["metadata"]["name"])] = d
    return out


def test_generated_manifests_are_up_to_date():
    # k8s/render.py in-process (its --check mode, without a second interpreter and Helm library).
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    k8s_render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(k8s_render)
    stale, orphans = k8s_render.differences(k8s_render.build())
    assert (stale, orphans) == ([], []), "k8s/ is stale: run .venv/bin/python k8s/render.py"


def test_base_renders_and_validates():
    ms = kustomize(K8S / "base")
    assert {m.kind for m in ms} >= {"RayService", "Service", "StatefulSet", "NetworkPolicy", "ConfigMap"}
    assert validate_all(ms) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_validates_and_sets_its_namespace(overlay):
    ms = kustomize(K8S / "overlays" / overlay)
    assert validate_all(ms) == []
    assert {m.doc["metadata"].get("namespace") for m in ms} == {"inference" if overlay == "gpu" else "inference-dev"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_equals_the_chart_with_its_example_values(overlay):
    from_kustomize = normalized([m.doc for m in kustomize(K8S / "overlays" / overlay)])
    from_helm = normalized([m.doc for m in render(load_values(CHART / "examples" / OVERLAYS[overlay]))])
    assert from_kustomize.keys() == from_helm.keys()
    for key in from_helm:
        assert from_kustomize[key] == from_helm[key], key


def test_dev_cpu_overlay_is_cpu_only():
    [rs] = [m.doc for m in kustomize(K8S / "overlays" / "dev-cpu") if m.kind == "RayService"]
    text = str(rs)
    assert "nvidia.com/gpu" not in text
    assert "tiny-target" in rs["spec"]["serveConfigV2"]
