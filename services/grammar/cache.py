"""Compiled-grammar cache: an in-process LRU in front of Redis (shared by every replica and
surviving restarts). Keyed by tokenizer fingerprint + spec hash + xgrammar version (its
serialization format is versioned). Values are xgrammar's JSON serialization, zlib-compressed in
Redis (JSON of token masks compresses about 4x).

Errors (invalid grammar, over limit, timeout) are cached in memory only: a client retrying a
pathological grammar costs one lookup, while a fix to our limits takes effect on restart.
Redis down or slow = cache bypass: a short socket timeout, then a cool-off before retrying.
"""
from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from importlib.metadata import version

from services.telemetry import metrics

log = logging.getLogger(__name__)
XGRAMMAR_VERSION = version("xgrammar")


@dataclass(slots=True, frozen=True)
class CacheHit:
    value: str | None          # serialized compiled grammar
    error: dict | None         # GrammarError.to_dict() of a cached failure
    source: str                # "memory" | "redis"


class GrammarCache:
    def __init__(self, redis_url: str | None = None, *, max_entries: int = 512,
                 max_bytes: int = 512 * 1024 * 1024, ttl_s: int = 7 * 24 * 3600,
                 namespace: str = "inference:grammar", redis_timeout_s: float = 0.25,
                 redis_cooloff_s: float = 5.0) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.namespace = namespace
        self._lru: OrderedDict[str, tuple[str | None, dict | None]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._cooloff_s = redis_cooloff_s
        self._redis_down_until = 0.0
        self._redis = None
        if redis_url:
            import redis  # noqa: PLC0415
            self._redis = redis.Redis.from_url(redis_url, socket_timeout=redis_timeout_s,
                                               socket_connect_timeout=redis_timeout_s)
        self.memory_hits = self.redis_hits = self.misses = self.redis_errors = 0

    def key(self, fp: str, spec_hash: str) -> str:
        return f"{self.namespace}:xgr{XGRAMMAR_VERSION}:{fp}:{spec_hash}"

    def get(self, fp: str, spec_hash: str) -> CacheHit | None:
        k = self.key(fp, spec_hash)
        with self._lock:
            entry = self._lru.get(k)
            if entry is not None:
                self._lru.move_to_end(k)
                self.memory_hits += 1
        if entry is not None:
            metrics.GRAMMAR_CACHE_LOOKUPS.labels("memory_hit").inc()
            return CacheHit(entry[0], entry[1], "memory")
        blob = self._redis_call("get", k)
        if blob is not None:
            value = zlib.decompress(blob).decode()
            self._remember(k, value, None)
            with self._lock:
                self.redis_hits += 1
            metrics.GRAMMAR_CACHE_LOOKUPS.labels("redis_hit").inc()
            return CacheHit(value, None, "redis")
        with self._lock:
            self.misses += 1
        metrics.GRAMMAR_CACHE_LOOKUPS.labels("miss").inc()
        return None

    def put(self, fp: str, spec_hash: str, value: str) -> None:
        k = self.key(fp, spec_hash)
        self._remember(k, value, None)
        self._redis_call("set", k, zlib.compress(value.encode(), 1), ex=self.ttl_s)

    def put_error(self, fp: str, spec_hash: str, error: dict) -> None:
        self._remember(self.key(fp, spec_hash), None, error)

    def stats(self) -> dict:
        with self._lock:
            return {"memory_hits": self.memory_hits, "redis_hits": self.redis_hits, "misses": self.misses,
                    "redis_errors": self.redis_errors, "entries": len(self._lru), "bytes": self._bytes,
                    "redis": self._redis is not None}

    def clear_memory(self) -> None:
        with self._lock:
            self._lru.clear()
            self._bytes = 0

    def _remember(self, k: str, value: str | None, error: dict | None) -> None:
        size = len(value) if value else 256
        with self._lock:
            old = self._lru.pop(k, None)
            if old is not None:
                self._bytes -= len(old[0]) if old[0] else 256
            self._lru[k] = (value, error)
            self._bytes += size
            while self._lru and (len(self._lru) > self.max_entries or self._bytes > self.max_bytes):
                _, (v, _) = self._lru.popitem(last=False)
                self._bytes -= len(v) if v else 256

    def _redis_call(self, op: str, *args, **kwargs):
        if self._redis is None or time.monotonic() < self._redis_down_until:
            return None
        try:
            return getattr(self._redis, op)(*args, **kwargs)
        except Exception as e:   # any Redis failure is a bypass, never a failed compile
            with self._lock:
                self.redis_errors += 1
            self._redis_down_until = time.monotonic() + self._cooloff_s
            log.warning("grammar cache: Redis %s failed (%s); bypassing it for %.0f s", op, e, self._cooloff_s)
            return None

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
