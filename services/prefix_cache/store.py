"""KV tier stores: where full KV blocks live outside a replica's own cache.

`KVTierStore` is the seam; `MemoryKVStore` (in-process, bounded, LRU) and `RedisKVStore` (shared by
all replicas, survives their restarts) implement it. `GuardedStore` puts a circuit breaker in
front of any store so that a dead, slow or full backend turns into misses and dropped writes,
never into a failed request.

Keys are bytes built by `block_key`: model fingerprint + KV layout fingerprint + the salted block
hash (services/prefix_cache/hashing.py), so a key names one block of one prefix of one tenant for
one model in one layout. Values are opaque blobs (services/prefix_cache/blob.py).
"""
from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .breaker import CircuitBreaker


class TierUnavailableError(RuntimeError):
    """The backend did not answer correctly (down, timed out, out of memory, protocol error)."""


def block_key(model_fingerprint: str, layout_fingerprint: str, block_hash: bytes) -> bytes:
    return f"kv:{model_fingerprint}:{layout_fingerprint}:".encode() + block_hash.hex().encode()


class KVTierStore(ABC):
    """A key-value store of KV block blobs.

    Invariants every implementation keeps:
    - `get_many(keys)` and `contains_many(keys)` return one entry per key, in the keys' order;
      an absent or expired key is None / False, never an error.
    - `put_many` is idempotent and content-addressed: a key always maps to the same block, so
      writing it twice (from two replicas) is harmless and the store may skip keys it holds.
    - The store never interprets values; checking them is the reader's job (BlockCodec.decode).
    - A store may forget any key at any time (LRU, TTL, maxmemory eviction).
    - Backend failures raise TierUnavailableError and nothing else; GuardedStore turns them into
      misses for the request path.
    - Thread-safe: the engine thread reads while the writer thread writes.
    """

    @abstractmethod
    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]: ...

    @abstractmethod
    def contains_many(self, keys: Sequence[bytes]) -> list[bool]: ...

    @abstractmethod
    def put_many(self, items: Sequence[tuple[bytes, bytes | memoryview]]) -> int:
        """Store the items; returns how many bytes went to the backend. Values may be memoryviews
        (sent as they are, without a copy); a store that keeps them must copy them."""

    @abstractmethod
    def delete_many(self, keys: Sequence[bytes]) -> None:
        """Forget the keys (a reader found their values corrupt; the next writer replaces them)."""

    def num_evictions(self) -> int | None:
        """Keys the backend evicted for memory since it started (None if it cannot tell)."""
        return None

    def close(self) -> None:
        pass


class MemoryKVStore(KVTierStore):
    """Bounded by total value bytes; evicts least recently used (reads and writes both count)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._evictions = 0
        self._data: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._lock:
            out = []
            for k in keys:
                v = self._data.get(k)
                if v is not None:
                    self._data.move_to_end(k)
                out.append(v)
            return out

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [k in self._data for k in keys]

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        written = 0
        with self._lock:
            for k, v in items:
                v = bytes(v)     # values may be views into a writer's buffer (BlockCodec.encode_batch)
                if len(v) > self.max_bytes:
                    continue  # could never fit; storing it would evict everything for nothing
                old = self._data.pop(k, None)
                if old is not None:
                    self.num_bytes -= len(old)
                self._data[k] = v
                self.num_bytes += len(v)
                written += len(v)
                while self.num_bytes > self.max_bytes:
                    _, dropped = self._data.popitem(last=False)
                    self.num_bytes -= len(dropped)
                    self._evictions += 1
        return written

    def delete_many(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            for k in keys:
                v = self._data.pop(k, None)
                if v is not None:
                    self.num_bytes -= len(v)

    def num_evictions(self) -> int:
        return self._evictions

    def __len__(self) -> int:
        return len(self._data)


class RedisKVStore(KVTierStore):
    """Redis as the shared tier. One round trip per call (pipelines); no retries, short socket
    timeouts: a slow Redis must cost the request path milliseconds, and the breaker stops even that.

    Reads refresh the TTL (GETEX), so hot prefixes stay while cold ones expire. Memory is bounded
    by the server (`maxmemory` + `maxmemory-policy allkeys-lru`; the chart sets both).
    """

    def __init__(self, url: str, ttl_s: int = 3600, socket_timeout_s: float = 0.25,
                 connect_timeout_s: float = 0.25, skip_existing: bool = True,
                 max_connections: int = 8) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self.skip_existing = skip_existing
        self.client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=connect_timeout_s,
            retry=Retry(NoBackoff(), 0), max_connections=max_connections,
            health_check_interval=0)

    def _run(self, build) -> list:
        try:
            pipe = self.client.pipeline(transaction=False)
            build(pipe)
            return pipe.execute()
        except (redis.RedisError, OSError) as e:
            raise TierUnavailableError(f"redis: {type(e).__name__}: {e}") from e

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        return self._run(lambda p: [p.getex(k, ex=self.ttl_s) for k in keys])

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        return [bool(n) for n in self._run(lambda p: [p.exists(k) for k in keys])]

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        if not items:
            return 0
        if self.skip_existing:
            # Every replica that computes a hot prefix publishes it; one EXISTS round trip saves
            # shipping megabytes that Redis already holds (keys are content-addressed).
            present = self.contains_many([k for k, _ in items])
            items = [kv for kv, p in zip(items, present) if not p]
            if not items:
                return 0
        self._run(lambda p: [p.set(k, v, ex=self.ttl_s) for k, v in items])
        return sum(len(v) for _, v in items)

    def delete_many(self, keys: Sequence[bytes]) -> None:
        if keys:
            self._run(lambda p: p.delete(*keys))

    def num_evictions(self) -> int | None:
        try:
            return int(self.client.info("stats").get("evicted_keys", 0))
        except (redis.RedisError, OSError):
            return None

    def close(self) -> None:
        self.client.close()


class GuardedStore(KVTierStore):
    """A store behind a circuit breaker: failures and open-breaker calls become misses / no-ops.

    The `try_*` methods return None where the backend was bypassed or failed, so callers can tell a
    bypass from a miss (metrics); the KVTierStore methods return misses instead.
    `last_rtt_s` (the latest successful call's wall time) feeds the cost model.
    """

    def __init__(self, inner: KVTierStore, breaker: CircuitBreaker) -> None:
        self.inner = inner
        self.breaker = breaker
        self.num_errors = 0
        self.last_error: str | None = None
        self.last_rtt_s: float | None = None

    def _call(self, fn, arg):
        if not self.breaker.allow():
            return None
        t0 = time.perf_counter()
        try:
            out = fn(arg)
        except TierUnavailableError as e:
            self.num_errors += 1
            self.last_error = str(e)
            self.breaker.record_failure()
            return None
        except BaseException:
            self.breaker.record_failure()   # a bug still ends a half-open probe; it propagates
            raise
        self.last_rtt_s = time.perf_counter() - t0
        self.breaker.record_success()
        return out

    def try_get_many(self, keys: Sequence[bytes]) -> list[bytes | None] | None:
        return self._call(self.inner.get_many, keys)

    def try_contains_many(self, keys: Sequence[bytes]) -> list[bool] | None:
        return self._call(self.inner.contains_many, keys)

    def try_put_many(self, items: Sequence[tuple[bytes, bytes]]) -> int | None:
        return self._call(self.inner.put_many, items)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        out = self.try_get_many(keys)
        return [None] * len(keys) if out is None else out

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        out = self.try_contains_many(keys)
        return [False] * len(keys) if out is None else out

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        return self.try_put_many(items) or 0

    def delete_many(self, keys: Sequence[bytes]) -> None:
        self._call(self.inner.delete_many, keys)

    def num_evictions(self) -> int | None:
        return self.inner.num_evictions() if self.breaker.state == "closed" else None

    def close(self) -> None:
        self.inner.close()
