"""What the chart renders: valid Kubernetes objects (two API versions), a RayService valid against
KubeRay's CRD schema, and the properties a platform team relies on (restricted pods, default-deny
network, probes, drain, Redis as a cache, API keys from a Secret, Ray auth on)."""
from __future__ import annotations

import pytest
import yaml

from deploylib import EXAMPLES, Manifest, load_values, pod_specs, ray_pod_templates, render, validate_all

SCENARIOS = {"defaults": {}} | {p.stem: load_values(p) for p in EXAMPLES} | {
    # Every optional object on at once.
    "everything-on": {
        "ingress": {"http": {"enabled": True, "className": "nginx", "tlsSecret": "tls"},
                    "grpc": {"enabled": True, "className": "nginx"}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "ray": {"gcsFaultTolerance": {"enabled": True}},
        "model": {"download": {"enabled": True, "repoId": "org/model", "tokenSecret": "hf"}},
        "kuberay-operator": {"enabled": False},
        "apiKeys": {"keys": [{"key": "k-0123456789", "tenant": "t", "rate_limit_tokens_per_s": 10, "burst": 20}]},
        "imagePullSecrets": [{"name": "regcred"}],
        "otel": {"collector": {"replicas": 2}},
        "serve": {"gateway": {"mode": "colocated", "directGrpcPort": 9100}},
    },
    "everything-off": {
        "redis": {"enabled": False, "externalUrl": "redis://cache.example:6379/0"},
        "otel": {"collector": {"enabled": False}, "endpoint": "http://otel.example:4317"},
        "networkPolicy": {"enabled": False}, "podDisruptionBudget": {"enabled": False},
        "grafana": {"dashboards": {"enabled": False}}, "serviceAccount": {"create": False},
        "ray": {"autoscaling": {"enabled": False}, "auth": False}, "serve": {"authDisabled": True},
        "model": {"source": "hostPath"},
    },
}
RENDERED = {name: render(values) for name, values in SCENARIOS.items()}


def by_kind(ms: list[Manifest], kind: str) -> list[dict]:
    return [m.doc for m in ms if m.kind == kind]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_manifest_validates(scenario):
    ms = RENDERED[scenario]
    assert validate_all(ms) == []
    names = [(m.kind, m.name) for m in ms]
    assert len(names) == len(set(names)), "two objects share a kind and name"


def test_optional_objects_follow_their_switches():
    on = {m.kind for m in RENDERED["everything-on"]}
    assert {"Ingress", "ServiceMonitor", "NetworkPolicy", "PodDisruptionBudget", "StatefulSet",
            "Deployment", "ConfigMap", "Secret", "RayService"} <= on
    assert len(by_kind(RENDERED["everything-on"], "StatefulSet")) == 2      # cache + GCS Redis
    off = {m.kind for m in RENDERED["everything-off"]}
    assert off == {"RayService", "Service"}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_meet_the_restricted_profile(scenario):
    for where, spec in [p for m in RENDERED[scenario] for p in pod_specs(m)]:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert "hostNetwork" not in spec and "hostPID" not in spec, where
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert "privileged" not in sc and "add" not in sc["capabilities"], (where, c["name"])
            assert c["resources"]["limits"]["memory"], (where, c["name"])


def test_head_and_gpu_workers():
    [rs] = by_kind(RENDERED["defaults"], "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}        # Ray's own auth stays on
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    [w] = cluster["workerGroupSpecs"]
    assert (w["minReplicas"], w["maxReplicas"]) == (1, 4)
    spec = w["template"]["spec"]
    [c] = spec["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 1200
    assert spec["automountServiceAccountToken"] is False


def test_cpu_example_has_no_gpu():
    [rs] = by_kind(RENDERED["values-dev-cpu"], "RayService")
    for _, tmpl in ray_pod_templates(rs):
        c = tmpl["spec"]["containers"][0]
        assert not any("gpu" in k for k in c["resources"].get("limits", {})), c["resources"]
        assert c["image"].endswith("-cpu")
        assert {"name": "INFER_LLM_NUM_GPUS", "value": "0"} in c["env"]
        assert "models" not in {v["name"] for v in tmpl["spec"]["volumes"]}


def test_model_never_downloads_unless_asked():
    for name, ms in RENDERED.items():
        [rs] = by_kind(ms, "RayService")
        downloads = [t for _, t in ray_pod_templates(rs) if t["spec"].get("initContainers")]
        assert bool(downloads) == (name == "everything-on"), name
        for _, tmpl in ray_pod_templates(rs):
            env = {e["name"]: e["value"] for e in tmpl["spec"]["containers"][0]["env"]}
            assert env["HF_HUB_OFFLINE"] == ("0" if name == "everything-on" else "1")
            mounts = {m["name"]: m for m in tmpl["spec"]["containers"][0]["volumeMounts"]}
            if "models" in mounts:
                assert mounts["models"]["readOnly"] is True


def test_redis_is_a_cache_and_gcs_redis_never_evicts():
    sets = {d["metadata"]["name"]: d for d in by_kind(RENDERED["everything-on"], "StatefulSet")}
    cache = sets["inference-stack-redis"]["spec"]
    args = cache["template"]["spec"]["containers"][0]["args"]
    flags = dict(zip(args[::2], args[1::2]))
    assert flags["--maxmemory-policy"] == "allkeys-lru" and flags["--maxmemory"] == "2gb"
    assert flags["--save"] == "" and flags["--appendonly"] == "no"
    assert "volumeClaimTemplates" not in cache
    gcs = sets["inference-stack-gcs-redis"]["spec"]
    args = gcs["template"]["spec"]["containers"][0]["args"]
    flags = dict(zip(args[::2], args[1::2]))
    assert flags["--maxmemory-policy"] == "noeviction" and flags["--appendonly"] == "yes"
    assert gcs["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "2Gi"
    [rs] = by_kind(RENDERED["everything-on"], "RayService")
    address = rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"]
    assert address == "redis://inference-stack-gcs-redis:6379"


def test_network_is_default_deny_with_allow_lists():
    pols = {d["metadata"]["name"]: d["spec"] for d in by_kind(RENDERED["defaults"], "NetworkPolicy")}
    deny = pols["inference-stack-default-deny"]
    assert deny["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny and "egress" not in deny
    assert deny["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "inference-stack"
    redis = pols["inference-stack-redis"]
    assert redis["egress"] == [] and redis["ingress"][0]["ports"] == [{"port": 6379, "protocol": "TCP"}]
    ray = pols["inference-stack-ray"]
    opened = {p["port"] for rule in ray["ingress"] for p in rule.get("ports", [])}
    assert opened == {8000, 9000, 8265, 8080}
    # Only the gateway ports are open to any source by default.
    assert {p["port"] for r in ray["ingress"] if "from" not in r for p in r["ports"]} <= {8000, 9000, 8080}


def test_api_keys_come_from_a_secret():
    for name in ("defaults", "values-gpu", "everything-on"):
        [rs] = by_kind(RENDERED[name], "RayService")
        for _, tmpl in ray_pod_templates(rs):
            vols = {v["name"]: v for v in tmpl["spec"]["volumes"]}
            assert vols["api-keys"]["secret"]["secretName"] in ("inference-stack-api-keys", "inference-api-keys")
    # existingSecret: the chart makes no Secret of its own.
    assert by_kind(RENDERED["values-gpu"], "Secret") == []
    [secret] = by_kind(RENDERED["everything-on"], "Secret")
    keys = yaml.safe_load(secret["stringData"]["api-keys.yaml"])
    assert keys == {"keys": [{"key": "k-0123456789", "tenant": "t", "rate_limit_tokens_per_s": 10, "burst": 20}]}


def test_pdbs_cover_workers_and_replicated_collectors():
    [pdb] = by_kind(RENDERED["defaults"], "PodDisruptionBudget")     # no PDB on the single head
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/role"] == "worker"
    pdbs = {d["metadata"]["name"] for d in by_kind(RENDERED["everything-on"], "PodDisruptionBudget")}
    assert pdbs == {"inference-stack-workers", "inference-stack-otel-collector"}


def test_dashboards_configmap_is_labelled_and_holds_the_json():
    [cm] = [d for d in by_kind(RENDERED["defaults"], "ConfigMap") if d["metadata"]["name"].endswith("-dashboards")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(cm["data"]) == {"inference-service.json", "inference-gpu.json"}


def test_gateway_service_selects_serving_ray_pods():
    [svc] = [d for d in by_kind(RENDERED["defaults"], "Service") if d["metadata"]["name"] == "inference-stack"]
    sel = svc["spec"]["selector"]
    assert sel["ray.io/serve"] == "true" and sel["app.kubernetes.io/component"] == "ray"
    assert {p["port"] for p in svc["spec"]["ports"]} == {8000, 9000}


def test_direct_grpc_port_opens_a_headless_service():
    ms = RENDERED["everything-on"]
    [svc] = [d for d in by_kind(ms, "Service") if d["metadata"]["name"] == "inference-stack-grpc-direct"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"]["ray.io/serve"] == "true"
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(9100, "grpc-direct")]
    [rs] = by_kind(ms, "RayService")
    for group, tmpl in ray_pod_templates(rs):
        ports = {p["name"]: p["containerPort"] for c in tmpl["spec"]["containers"] for p in c.get("ports", [])}
        assert ports["grpc-direct"] == 9100, group
    assert 'direct_grpc_port: "9100"' in rs["spec"]["serveConfigV2"]
    [ray] = [d["spec"] for d in by_kind(ms, "NetworkPolicy") if d["metadata"]["name"] == "inference-stack-ray"]
    assert 9100 in {p["port"] for rule in ray["ingress"] for p in rule.get("ports", [])}
    assert not [d for d in by_kind(RENDERED["defaults"], "Service") if d["metadata"]["name"].endswith("grpc-direct")]
