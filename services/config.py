"""The stack's one typed config: `StackConfig`, read from env vars with prefix INFER_ (and optionally
a YAML/JSON file named by INFER_CONFIG_FILE; env overrides the file).

The names are fixed team-wide (the Helm chart sets them). Every EngineConfig field is reachable as
INFER_ENGINE_<FIELD>. Ray Serve's application builder receives the same names, lowercase and
without the prefix (`StackConfig.from_args`). Bad values fail loudly, naming the variable.

    python -m services.config          # prints the resolved config as JSON
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from services.engine.config import TINY_MODEL, EngineConfig

PREFIX = "INFER_"
ENGINE_PREFIX = "ENGINE_"
OTEL_EXPORTERS = ("none", "console", "otlp")
# KVTierConfig.write_policy's values, spelled here too: services/prefix_cache/tier_config.py imports
# torch, which the gateway never loads (tests/unit/test_stack_config.py checks the two agree).
KV_TIER_WRITE_POLICIES = ("computed", "reused")
GATEWAY_MODES = ("separate", "colocated")


@dataclass(slots=True, frozen=True)
class StackConfig:
    model: str = TINY_MODEL
    model_name: str = "tiny"
    draft_model: str = ""
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 9000
    llm_min_replicas: int = 1
    llm_max_replicas: int = 1
    llm_num_gpus: float = 0.0
    llm_target_ongoing_requests: int = 16
    llm_max_queued_requests: int = 128
    gateway_replicas: int = 1
    # "separate": Gateway replicas call LLMServer replicas through a Serve handle (prefix-aware
    # routing). "colocated": each LLM replica is also the gateway (one deployment, no handle hop;
    # HAProxy balances over the replicas; a replica's missing prefix comes from the Redis KV tier).
    gateway_mode: str = "separate"
    # A port on which every gateway replica also serves gRPC itself, past HAProxy and Serve's request
    # path (services/gateway/direct.py); replicas on one host take the next free ones. 0 = off.
    direct_grpc_port: int = 0
    grammar_replicas: int = 1
    grammar_workers: int = 1            # compile worker processes per GrammarService (or LLM) replica
    grammar_compile_threads: int = 1    # xgrammar threads per compile
    grammar_warm_up: bool = True        # workers compile the warm-up set while idle after start
    draft_replicas: int = 0
    redis_url: str = ""
    # Which blocks the replica's KV tier writes to Redis (KVTierConfig.write_policy): "reused" = a
    # block on its first local prefix hit (nothing at 0% hits), "computed" = every full block (a cold
    # replica can load anything; +4-7% wall time on the 2-core box: README).
    kv_tier_write_policy: str = "reused"
    api_keys_file: str = ""
    auth_disabled: bool = False
    max_body_bytes: int = 1048576
    otel_exporter: str = "none"
    otel_endpoint: str = ""
    service_name: str = "inference-stack"
    # Ray resources per replica; fractions keep a 2-CPU laptop schedulable.
    llm_num_cpus: float = 0.0
    gateway_num_cpus: float = 0.0
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"{PREFIX}{name.upper()} must be {allowed}, got {getattr(self, name)!r}")

        need(bool(self.model_name), "model_name", "a non-empty served model name")
        for port in ("http_port", "grpc_port"):
            need(0 < getattr(self, port) < 65536, port, "a TCP port in [1, 65535]")
        need(self.llm_min_replicas >= 0, "llm_min_replicas", ">= 0")
        need(self.llm_max_replicas >= max(1, self.llm_min_replicas), "llm_max_replicas",
             f">= max(1, INFER_LLM_MIN_REPLICAS={self.llm_min_replicas})")
        need(self.llm_num_gpus >= 0, "llm_num_gpus", ">= 0")
        need(self.llm_target_ongoing_requests >= 1, "llm_target_ongoing_requests", ">= 1")
        need(self.llm_max_queued_requests >= 0, "llm_max_queued_requests", ">= 0")
        need(0 <= self.direct_grpc_port < 65536, "direct_grpc_port", "0 (off) or a TCP port in [1, 65535]")
        need(self.gateway_replicas >= 1, "gateway_replicas", ">= 1")
        need(self.gateway_mode in GATEWAY_MODES, "gateway_mode", " or ".join(map(repr, GATEWAY_MODES)))
        need(self.grammar_replicas >= 0, "grammar_replicas", ">= 0")
        need(self.grammar_workers >= 1, "grammar_workers", ">= 1")
        need(self.grammar_compile_threads >= 1, "grammar_compile_threads", ">= 1")
        need(self.draft_replicas >= 0, "draft_replicas", ">= 0")
        need(self.max_body_bytes >= 1024, "max_body_bytes", ">= 1024")
        need(self.otel_exporter in OTEL_EXPORTERS, "otel_exporter", " or ".join(OTEL_EXPORTERS))
        need(self.otel_exporter != "otlp" or bool(self.otel_endpoint), "otel_endpoint",
             "an OTLP gRPC URL (e.g. http://otel-collector:4317) when INFER_OTEL_EXPORTER=otlp")
        need(not self.redis_url or self.redis_url.startswith(("redis://", "rediss://", "unix://")),
             "redis_url", 'a redis:// URL or "" (no Redis tier)')
        need(self.kv_tier_write_policy in KV_TIER_WRITE_POLICIES, "kv_tier_write_policy",
             " or ".join(map(repr, KV_TIER_WRITE_POLICIES)))
        need(not self.api_keys_file or Path(self.api_keys_file).is_file(), "api_keys_file",
             "an existing YAML/JSON file or \"\"")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "StackConfig":
        """Env vars INFER_*, on top of the file named by INFER_CONFIG_FILE, on top of defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = env.get(PREFIX + "CONFIG_FILE")
        if path:
            values.update(_lower_keys(_load_file(path)))
        for key, raw in env.items():
            if key.startswith(PREFIX) and key != PREFIX + "CONFIG_FILE":
                values[key[len(PREFIX):].lower()] = raw
        return cls.from_args(values)

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> "StackConfig":
        """From a flat dict with the lowercase names (what Ray Serve hands the app builder)."""
        stack_fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "engine"}
        engine_fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
        top: dict[str, Any] = {}
        eng: dict[str, Any] = {}
        for key, raw in args.items():
            key = key.lower()
            if key.startswith(ENGINE_PREFIX.lower()):
                name = key[len(ENGINE_PREFIX):]
                if name not in engine_fields:
                    raise ValueError(f"{PREFIX}{key.upper()} is not an engine setting; known: "
                                     + ", ".join(f"{PREFIX}{ENGINE_PREFIX}{n.upper()}" for n in engine_fields))
                eng[name] = _coerce(PREFIX + key.upper(), raw, engine_fields[name].type)
            elif key in stack_fields:
                top[key] = _coerce(PREFIX + key.upper(), raw, stack_fields[key].type)
            else:
                raise ValueError(f"{PREFIX}{key.upper()} is not a known setting; known: "
                                 + ", ".join(PREFIX + n.upper() for n in stack_fields))
        # The served model directory is the engine's model unless the engine's is set explicitly.
        eng.setdefault("model", top.get("model", TINY_MODEL))
        try:
            engine = EngineConfig(**eng)
        except ValueError as e:
            raise ValueError(f"engine config ({PREFIX}{ENGINE_PREFIX}*): {e}") from e
        return cls(engine=engine, **top)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _lower_keys(d: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        k = str(k).lower()
        if k.startswith(PREFIX.lower()):
            k = k[len(PREFIX):]
        if k == "engine" and isinstance(v, Mapping):   # nested `engine:` section in YAML
            out.update({f"engine_{ek.lower()}": ev for ek, ev in v.items()})
        else:
            out[k] = v
    return out


def _load_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{PREFIX}CONFIG_FILE={path!r} does not exist")
    text = p.read_text()
    if p.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml
        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{PREFIX}CONFIG_FILE={path!r} must hold a mapping of settings")
    return data


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _coerce(name: str, raw: Any, annotation: Any) -> Any:
    """Turns an env string (or a YAML value) into the field's type, per its annotation string."""
    ann = str(annotation).replace(" ", "")
    optional = "None" in ann
    base = ann.replace("|None", "").replace("None|", "")
    if raw is None or (optional and isinstance(raw, str) and raw.strip().lower() in ("", "none", "null")):
        if optional:
            return None
        raise ValueError(f"{name} must be set to a {base}")
    try:
        if base == "bool":
            if isinstance(raw, bool):
                return raw
            s = str(raw).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError
        if base == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(str(raw).strip()) if isinstance(raw, str) else int(raw)
        if base == "float":
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if base == "str":
            return str(raw)
    except ValueError:
        words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
        raise ValueError(f"{name} must be {words.get(base, base)}" + (" or empty" if optional else "")
                         + f", got {raw!r}") from None
    raise ValueError(f"{name}: unsupported setting type {ann}")


if __name__ == "__main__":
    print(json.dumps(StackConfig.from_env().to_dict(), indent=2, default=str))
