"""The locustfiles' settings, from LOADTEST_* environment variables (`loadtest.run` sets them; on
Kubernetes the worker manifest does). Env vars rather than Locust CLI options because the two
locustfiles are loaded into one Locust process and must not both register the same options.

    LOADTEST_MODEL          served model name ("" = ask the server: /v1/models or ListModels)
    LOADTEST_API_KEYS       comma-separated API keys; user i sends key i mod n (its tenant); "" = none
    LOADTEST_GRPC_TARGET    host:port of the gRPC API (default 127.0.0.1:9000)
    LOADTEST_GRPC_APP       Ray Serve application name sent as gRPC metadata "application" ("" = none)
    LOADTEST_MAX_TOKENS     cap on every reply's max_tokens ("" = each scenario's own)
    LOADTEST_MAX_MODEL_LEN  context length to size prompts for ("" = ask the server)
    LOADTEST_IGNORE_EOS     true = fixed reply lengths (the JSON scenario excepted)
    LOADTEST_THINK_TIME_S   each user waits uniform(0, this) seconds between requests (default 1)
    LOADTEST_TIMEOUT_S      per-request timeout in seconds (default 300)
    LOADTEST_SEED           base seed of the prompts ("" = a random one per process: a rerun must not
                            find its prompts in the prefix cache); user i of worker w uses
                            seed + i + 100000 * w, so distributed workers never duplicate prompts
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass

PREFIX = "LOADTEST_"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
DEFAULT_GRPC_TARGET = "127.0.0.1:9000"
DEFAULT_THINK_TIME_S = 1.0
DEFAULT_TIMEOUT_S = 300.0


# One numbering for every user of this process, whichever locustfile defines its class: a REST user
# and a gRPC user must not share an index, or they would send the same prompts with the same key.
_user_indexes = itertools.count()


def next_user_index() -> int:
    return next(_user_indexes)


@dataclass(slots=True, frozen=True)
class Settings:
    model: str | None = None
    api_keys: tuple[str, ...] = ()
    grpc_target: str = DEFAULT_GRPC_TARGET
    grpc_app: str | None = None
    max_tokens: int | None = None
    max_model_len: int | None = None
    ignore_eos: bool = False
    think_time_s: float = DEFAULT_THINK_TIME_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    seed: int | None = None

    def api_key_for(self, user_index: int) -> str | None:
        return self.api_keys[user_index % len(self.api_keys)] if self.api_keys else None

    def user_seed(self, user_index: int, worker_index: int, fallback: int) -> int:
        return (self.seed if self.seed is not None else fallback) + user_index + 100_000 * worker_index

    def to_env(self) -> dict[str, str]:
        """The inverse of `from_env` (what `loadtest.run` exports to the Locust process)."""
        def s(v: object) -> str:
            return "" if v is None else str(v)
        return {PREFIX + "MODEL": s(self.model), PREFIX + "API_KEYS": ",".join(self.api_keys),
                PREFIX + "GRPC_TARGET": self.grpc_target, PREFIX + "GRPC_APP": s(self.grpc_app),
                PREFIX + "MAX_TOKENS": s(self.max_tokens), PREFIX + "MAX_MODEL_LEN": s(self.max_model_len),
                PREFIX + "IGNORE_EOS": "true" if self.ignore_eos else "false",
                PREFIX + "THINK_TIME_S": s(self.think_time_s), PREFIX + "TIMEOUT_S": s(self.timeout_s),
                PREFIX + "SEED": s(self.seed)}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env

        def get(name: str) -> str:
            return env.get(PREFIX + name, "").strip()

        def number(name: str, kind: type, minimum: float) -> float | int | None:
            raw = get(name)
            if not raw:
                return None
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{PREFIX}{name} must be {'an integer' if kind is int else 'a number'}, "
                                 f"got {raw!r}") from None
            if value < minimum:
                raise ValueError(f"{PREFIX}{name} must be >= {minimum}, got {raw!r}")
            return value

        eos = get("IGNORE_EOS").lower()
        if eos not in _TRUE + _FALSE:
            raise ValueError(f"{PREFIX}IGNORE_EOS must be true or false, got {eos!r}")
        target = get("GRPC_TARGET") or DEFAULT_GRPC_TARGET
        if ":" not in target:
            raise ValueError(f"{PREFIX}GRPC_TARGET must be host:port, got {target!r}")
        think, timeout, seed = number("THINK_TIME_S", float, 0), number("TIMEOUT_S", float, 0.001), number("SEED", int, 0)
        return cls(model=get("MODEL") or None,
                   api_keys=tuple(k.strip() for k in get("API_KEYS").split(",") if k.strip()),
                   grpc_target=target, grpc_app=get("GRPC_APP") or None,
                   max_tokens=number("MAX_TOKENS", int, 1), max_model_len=number("MAX_MODEL_LEN", int, 16),
                   ignore_eos=eos in _TRUE, think_time_s=DEFAULT_THINK_TIME_S if think is None else think,
                   timeout_s=DEFAULT_TIMEOUT_S if timeout is None else timeout, seed=seed)
