"""API keys → tenants, and per-tenant token buckets.

Keys file (YAML or JSON), named by INFER_API_KEYS_FILE:
    keys:
      - {key: sk-..., tenant: acme, rate_limit_tokens_per_s: 2000, burst: 8000}
A request costs its prompt tokens plus the most tokens it may generate (max_tokens × n), capped at
the tenant's burst so that one large request drains the bucket rather than being refused forever.
The tenant name is also the engine's cache salt: tenants never share prefix-cache blocks.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.gateway.errors import APIError

ANONYMOUS = "anonymous"   # the tenant of every request when auth is disabled


@dataclass(slots=True, frozen=True)
class Tenant:
    name: str
    rate_limit_tokens_per_s: float | None = None   # None = unlimited
    burst: float | None = None


@dataclass(slots=True)
class TokenBucket:
    rate: float                 # tokens added per second
    capacity: float             # the burst
    tokens: float = -1.0        # set to capacity on first use (a full bucket)
    updated: float = field(default_factory=time.monotonic)

    def take(self, cost: float, now: float | None = None) -> float | None:
        """Takes `cost` tokens; returns None on success, else the seconds until they are there."""
        now = time.monotonic() if now is None else now
        if self.tokens < 0:
            self.tokens = self.capacity
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        cost = min(cost, self.capacity)
        if self.tokens >= cost:
            self.tokens -= cost
            return None
        return (cost - self.tokens) / self.rate


class Authenticator:
    """Maps bearer keys to tenants and enforces each tenant's bucket (per gateway replica)."""

    def __init__(self, tenants_by_key: dict[str, Tenant], disabled: bool = False) -> None:
        self._by_key = dict(tenants_by_key)
        self._disabled = disabled
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str, disabled: bool = False) -> "Authenticator":
        if not path:
            if not disabled:
                raise ValueError("INFER_API_KEYS_FILE must name a keys file (or set INFER_AUTH_DISABLED=true)")
            return cls({}, disabled=True)
        return cls(load_keys(path), disabled=disabled)

    @property
    def disabled(self) -> bool:
        return self._disabled

    def authenticate(self, authorization: str | None) -> Tenant:
        """`authorization` is the raw "Bearer <key>" header/metadata value."""
        if self._disabled:
            return Tenant(ANONYMOUS)
        if not authorization:
            raise APIError(401, "Missing API key: send the header 'Authorization: Bearer <key>' "
                                "(gRPC: metadata 'authorization').", code="missing_api_key")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "Malformed Authorization value: expected 'Bearer <key>'.",
                           code="invalid_api_key")
        tenant = self._by_key.get(key.strip())
        if tenant is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return tenant

    def charge(self, tenant: Tenant, cost: int) -> None:
        """Raises 429 (with retry_after) when the tenant's bucket lacks `cost` tokens."""
        if tenant.rate_limit_tokens_per_s is None:
            return
        with self._lock:
            bucket = self._buckets.get(tenant.name)
            if bucket is None:
                bucket = TokenBucket(tenant.rate_limit_tokens_per_s, tenant.burst or tenant.rate_limit_tokens_per_s)
                self._buckets[tenant.name] = bucket
            wait = bucket.take(cost)
        if wait is not None:
            raise APIError(429, f"Rate limit reached for tenant {tenant.name!r} "
                                f"({tenant.rate_limit_tokens_per_s:g} tokens/s, burst {bucket.capacity:g}); "
                                f"retry in {wait:.2f}s.", code="rate_limit_exceeded", retry_after=wait)


def load_keys(path: str) -> dict[str, Tenant]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"INFER_API_KEYS_FILE={path!r} does not exist")
    if p.suffix == ".json":
        data = json.loads(p.read_text())
    else:
        import yaml
        data = yaml.safe_load(p.read_text())
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a mapping with a list 'keys' of {{key, tenant, "
                         "rate_limit_tokens_per_s, burst}}")
    out: dict[str, Tenant] = {}
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("key"), str) or not e["key"]:
            raise ValueError(f"{path}: keys[{i}] needs a non-empty string 'key'")
        if not isinstance(e.get("tenant"), str) or not e["tenant"]:
            raise ValueError(f"{path}: keys[{i}] needs a non-empty string 'tenant'")
        rate, burst = e.get("rate_limit_tokens_per_s"), e.get("burst")
        for name, v in (("rate_limit_tokens_per_s", rate), ("burst", burst)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                raise ValueError(f"{path}: keys[{i}].{name} must be a number > 0 or absent, got {v!r}")
        if e["key"] in out:
            raise ValueError(f"{path}: keys[{i}] repeats a key already given to tenant {out[e['key']].name!r}")
        out[e["key"]] = Tenant(e["tenant"], None if rate is None else float(rate),
                               None if burst is None else float(burst))
    return out
