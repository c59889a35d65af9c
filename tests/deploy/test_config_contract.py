"""The chart speaks the stack's config: every INFER_* it sets is one services/config.py reads, the
values parse through StackConfig itself, and the Serve application gets the same settings as args.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import re

import pytest
import yaml

from deploylib import CHART, EXAMPLES, REPO, Manifest, deep_merge, load_values, ray_pod_templates, render
from services.config import PREFIX, StackConfig
from services.engine.config import EngineConfig

# Every values scenario the chart must handle: defaults, each example, optional features flipped.
SCENARIOS = {"defaults": {}} | {p.stem: load_values(p) for p in EXAMPLES} | {
    "everything-off": {"redis": {"enabled": False, "externalUrl": ""}, "otel": {"exporter": "none",
                       "collector": {"enabled": False}}, "serve": {"authDisabled": True}},
}


def known_env_names() -> set[str]:
    stack = {PREFIX + f.name.upper() for f in dataclasses.fields(StackConfig) if f.name != "engine"}
    engine = {f"{PREFIX}ENGINE_{f.name.upper()}" for f in dataclasses.fields(EngineConfig)}
    return stack | engine | {PREFIX + "CONFIG_FILE"}


def rayservice(values: dict) -> dict:
    [rs] = [m.doc for m in render(values) if m.kind == "RayService"]
    return rs


def container_envs(rs: dict) -> list[tuple[str, dict[str, str]]]:
    out = []
    for group, tmpl in ray_pod_templates(rs):
        for c in tmpl["spec"]["containers"]:
            out.append((f"{group}/{c['name']}", {e["name"]: e.get("value") for e in c.get("env", [])}))
    return out


def serve_config(rs: dict) -> dict:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_infer_env_var_is_a_config_name(scenario):
    known = known_env_names()
    for where, env in container_envs(rayservice(SCENARIOS[scenario])):
        infer = {k for k in env if k.startswith(PREFIX)}
        assert infer, f"{where} sets no INFER_* variables"
        assert infer - known == set(), f"{where} sets names services/config.py does not read"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_chart_env_parses_through_stack_config(scenario, tmp_path):
    """Types and ranges too: the env the chart sets is accepted by StackConfig.from_env.
    Paths that exist only in the pod are pointed at local stand-ins (a keys file, dummy weights)."""
    keys = tmp_path / "api-keys.yaml"
    keys.write_text("keys: []\n")
    for where, env in container_envs(rayservice(SCENARIOS[scenario])):
        infer = {k: v for k, v in env.items() if k.startswith(PREFIX)}
        if infer.get(PREFIX + "API_KEYS_FILE"):
            infer[PREFIX + "API_KEYS_FILE"] = str(keys)
        infer[PREFIX + "ENGINE_LOAD_FORMAT"] = "dummy"
        cfg = StackConfig.from_env(infer)
        assert cfg.http_port == int(infer[PREFIX + "HTTP_PORT"]), where
        assert cfg.max_body_bytes == int(infer[PREFIX + "MAX_BODY_BYTES"]), where


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_serve_args_equal_the_env(scenario):
    """build_app reads its args (StackConfig.from_args); the pods' env must say the same."""
    rs = rayservice(SCENARIOS[scenario])
    [app] = serve_config(rs)["applications"]
    assert app["import_path"] == "services.app:build_app"
    args = {PREFIX + k.upper(): str(v) for k, v in app["args"].items()}
    for where, env in container_envs(rs):
        assert {k: v for k, v in env.items() if k.startswith(PREFIX)} == args, where


def test_values_map_onto_the_config():
    v = deep_merge(load_values(CHART / "values.yaml"), {"serve": {"maxBodyBytes": 2097152,
                   "engine": {"max_num_seqs": 7, "gpu_memory_utilization": 0.85},
                   "kvTier": {"writePolicy": "computed"}, "gateway": {"mode": "colocated"}}})
    [(_, env)] = container_envs(rayservice(v))[:1]
    assert env["INFER_KV_TIER_WRITE_POLICY"] == "computed"
    assert env["INFER_GATEWAY_MODE"] == "colocated"
    assert env["INFER_MAX_BODY_BYTES"] == "2097152"          # no float64 "2.097152e+06"
    assert env["INFER_ENGINE_MAX_NUM_SEQS"] == "7"
    assert env["INFER_ENGINE_GPU_MEMORY_UTILIZATION"] == "0.85"
    assert env["INFER_REDIS_URL"] == "redis://inference-stack-redis:6379/0"
    assert env["INFER_OTEL_ENDPOINT"] == "http://inference-stack-otel-collector:4317"
    assert env["INFER_API_KEYS_FILE"] == "/etc/inference/api-keys/api-keys.yaml"


def test_schema_engine_keys_are_engine_config_fields():
    schema = json.loads((CHART / "values.schema.json").read_text())
    engine_keys = set(schema["properties"]["serve"]["properties"]["engine"]["properties"])
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    # `model` is set from model.* (the mounted directory), never as an engine value.
    assert engine_keys == fields - {"model"}


def test_ray_version_matches_requirements():
    pin = re.search(r"^ray\[serve\]==([0-9.]+)$", (REPO / "requirements.txt").read_text(), re.M)
    assert pin, "requirements.txt pins ray[serve]==X.Y.Z"
    assert load_values(CHART / "values.yaml")["ray"]["version"] == pin.group(1)


def test_ray_pods_run_serve_like_the_local_stack():
    """Serve's request-path settings in every Ray pod are the ones `make run`, the integration tests
    and the gateway benchmark start Ray with (services/run.py SERVE_ENV)."""
    from services.run import SERVE_ENV  # noqa: PLC0415
    assert load_values(CHART / "values.yaml")["ray"]["serveEnv"] == SERVE_ENV
    for where, env in container_envs(rayservice({})):
        assert {k: v for k, v in env.items() if k.startswith("RAY_SERVE_")} == SERVE_ENV, where


def _app_constants() -> dict[str, object]:
    app = REPO / "services" / "app.py"
    if not app.is_file():
        pytest.skip("services/app.py (the Serve application builder) does not exist yet")
    out = {}
    for node in ast.parse(app.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def test_grpc_servicers_match_the_app():
    servicers = _app_constants()["GRPC_SERVICER_FUNCTIONS"]
    assert serve_config(rayservice({}))["grpc_options"]["grpc_servicer_functions"] == servicers


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_workers_get_time_to_drain(scenario):
    """preStop sleep + Serve's graceful shutdown of in-flight requests fit in the grace period."""
    drain = float(_app_constants()["DRAIN_TIMEOUT_S"])
    rs = rayservice(SCENARIOS[scenario])
    for group, tmpl in ray_pod_templates(rs):
        if not group.startswith("worker"):
            continue
        spec = tmpl["spec"]
        [c] = spec["containers"]
        sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][-1].split()[-1])
        assert spec["terminationGracePeriodSeconds"] >= sleep + drain, group


def _manifests_by_kind(values: dict) -> dict[str, list[Manifest]]:
    out: dict[str, list[Manifest]] = {}
    for m in render(values):
        out.setdefault(m.kind, []).append(m)
    return out


def test_ports_line_up_from_service_to_serve():
    kinds = _manifests_by_kind({"serve": {"httpPort": 8080 + 1, "grpcPort": 9001}})
    [rs] = [m.doc for m in kinds["RayService"]]
    sc = serve_config(rs)
    assert sc["http_options"]["port"] == 8081 and sc["grpc_options"]["port"] == 9001
    for _, tmpl in ray_pod_templates(rs):
        ports = {p["name"]: p["containerPort"] for p in tmpl["spec"]["containers"][0]["ports"]}
        assert ports["serve"] == 8081 and ports["grpc"] == 9001
    [gw] = [m.doc for m in kinds["Service"] if m.name == "inference-stack"]
    assert {p["name"]: p["targetPort"] for p in gw["spec"]["ports"]} == {"http": "serve", "grpc": "grpc"}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_serve_config_is_what_ray_serve_accepts(scenario):
    """KubeRay hands serveConfigV2 to Ray's dashboard, which parses it as ServeDeploySchema."""
    from ray.serve.schema import ServeDeploySchema  # noqa: PLC0415  (imports Ray: a few seconds, once)
    cfg = ServeDeploySchema.model_validate(serve_config(rayservice(SCENARIOS[scenario])))
    assert cfg.http_options.port == 8000 and cfg.grpc_options.port == 9000
    assert cfg.proxy_location.value == "EveryNode"
    [app] = cfg.applications
    assert app.name == "inference" and app.route_prefix == "/"
