"""The chart lints with Helm's own engine, and its values schema turns wrong values away.

Lint runs Helm v4's linter (templates rendered, values.schema.json applied) on the default values
and on every example values file. Bad values are checked twice: by `jsonschema` against
values.schema.json, and by Helm itself (render refuses them), each naming the offending key.
"""
from __future__ import annotations

import json

import jsonschema
import pytest

from deploylib import CHART, EXAMPLES, deep_merge, lint, load_values, render

# The one finding allowed offline: the optional KubeRay operator subchart is declared in Chart.yaml
# but only fetched by `helm dependency build` (network). Helm reports it as a warning.
MISSING_DEP = "chart directory is missing these dependencies: kuberay-operator"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
DEFAULTS = load_values(CHART / "values.yaml")


def lint_findings(values: dict | None) -> list[str]:
    report = lint(values)
    assert report["total_charts_linted"] == 1
    # Severity: 1 info, 2 warning, 3 error.
    return [f"{m['path']}: {m['error']}" for m in report["messages"]
            if m["severity"] >= 2 and m["error"] != MISSING_DEP]


def test_lint_default_values():
    assert lint_findings(None) == []


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_lint_example_values(example):
    assert lint_findings(load_values(example)) == []


def test_lint_reports_the_missing_subchart_as_its_only_warning():
    report = lint(None, strict=True)
    assert [m["error"] for m in report["messages"] if m["severity"] >= 2] == [MISSING_DEP]


def test_there_are_example_values_files():
    assert {p.name for p in EXAMPLES} >= {"values-gpu.yaml", "values-dev-cpu.yaml"}


def test_schema_accepts_defaults_and_examples():
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    v = jsonschema.Draft7Validator(SCHEMA)
    for values in [DEFAULTS] + [deep_merge(DEFAULTS, load_values(p)) for p in EXAMPLES]:
        assert list(v.iter_errors(values)) == []


# (override, the key the error must name)
BAD_VALUES = [
    ({"redis": {"maxmemoryPolicy": "noeviction"}}, "maxmemoryPolicy"),
    ({"redis": {"maxmemory": "2 GB"}}, "maxmemory"),
    ({"redis": {"externalUrl": "http://redis:6379"}}, "externalUrl"),
    ({"serve": {"httpPort": 70000}}, "httpPort"),
    ({"serve": {"llm": {"numGpus": -1}}}, "numGpus"),
    ({"serve": {"engine": {"max_num_seqs": 0}}}, "max_num_seqs"),
    ({"serve": {"engine": {"dtype": "fp8"}}}, "dtype"),
    ({"serve": {"engine": {"max_num_sequences": 8}}}, "max_num_sequences"),
    ({"serve": {"maxBodyBytes": "1MB"}}, "maxBodyBytes"),
    ({"model": {"source": "s3"}}, "source"),
    ({"model": {"source": "hostPath", "download": {"enabled": True, "repoId": "org/model"}}}, "source"),
    ({"model": {"source": "image", "path": "models/tiny-target"}}, "path"),
    ({"ray": {"workers": {"gpus": -1}}}, "gpus"),
    ({"ray": {"upgradeStrategy": "Rolling"}}, "upgradeStrategy"),
    ({"ray": {"version": "latest"}}, "version"),
    ({"securityContext": {"runAsUser": 0}}, "runAsUser"),
    ({"otel": {"exporter": "jaeger"}}, "exporter"),
    ({"otel": {"collector": {"enabled": False}, "endpoint": ""}}, "endpoint"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"apiKeys": {"keys": [{"key": "0123456789abcdef"}]}}, "tenant"),
    ({"service": {"type": "ExternalName"}}, "type"),
    ({"replicaCount": 3}, "replicaCount"),
    ({"ray": {"serveEnv": {"SERVE_LOG_TO_STDERR": "0"}}}, "SERVE_LOG_TO_STDERR"),
    ({"ray": {"serveEnv": {"RAY_SERVE_LOG_TO_STDERR": 0}}}, "RAY_SERVE_LOG_TO_STDERR"),
    ({"serve": {"kvTier": {"writePolicy": "always"}}}, "writePolicy"),
    ({"serve": {"gateway": {"mode": "together"}}}, "mode"),
]


@pytest.mark.parametrize("override,key", BAD_VALUES, ids=[k for _, k in BAD_VALUES])
def test_schema_rejects_bad_values(override, key):
    errors = list(jsonschema.Draft7Validator(SCHEMA).iter_errors(deep_merge(DEFAULTS, override)))
    assert errors, f"values.schema.json accepted {override}"
    # The error names the key: in its path, or in its message (required / unexpected properties).
    assert any(key in e.absolute_path or key in e.message for e in errors), \
        [(list(e.absolute_path), e.message) for e in errors]


@pytest.mark.parametrize("override,key", BAD_VALUES[:8], ids=[k for _, k in BAD_VALUES[:8]])
def test_helm_itself_refuses_bad_values(override, key):
    import helm_python  # noqa: PLC0415
    with pytest.raises(helm_python.HelmError, match=key):
        render(override)


# Cross-field rules JSON Schema cannot say; the templates `fail` with a message naming the fix.
INCONSISTENT = [
    ({"serve": {"llm": {"maxReplicas": 9, "numGpus": 1}}, "ray": {"workers": {"maxReplicas": 4, "gpus": 2}}},
     "raise ray.workers.maxReplicas"),
    ({"ray": {"workers": {"minReplicas": 3, "replicas": 1, "maxReplicas": 4}}}, "minReplicas <= replicas"),
    ({"serve": {"llm": {"minReplicas": 3, "maxReplicas": 2}}}, "serve.llm.minReplicas"),
    ({"serve": {"llm": {"numGpus": 1}}, "ray": {"workers": {"gpus": 0}}}, "a replica runs on one node"),
    ({"serve": {"llm": {"numGpus": 2}}, "ray": {"workers": {"gpus": 1, "maxReplicas": 8}}}, "ray.workers.gpus=1"),
    ({"serve": {"draft": {"replicas": 1}}, "model": {"draftPath": ""}}, "model.draftPath"),
]


@pytest.mark.parametrize("override,message", INCONSISTENT, ids=[m for _, m in INCONSISTENT])
def test_inconsistent_values_fail_with_a_fix(override, message):
    import helm_python  # noqa: PLC0415
    with pytest.raises(helm_python.HelmError, match=message.replace(".", r"\.")):
        render(override)
