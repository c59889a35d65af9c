"""The prefix index in Redis: which replica holds which block hashes.

Layout: one Redis SET per replica, `pidx:{namespace}:{replica_id}`, whose members are the 16-byte
block hashes the replica holds in its own KV cache. Every publish refreshes the set's TTL, so a
replica that dies drops out of the index within `ttl_s`, and a live one stays in it as long as it
publishes or calls `heartbeat`. Updates are cheap and batched (one pipeline of SADD / SREM /
EXPIRE); `sync` replaces the whole set (repairs updates lost while Redis was away).

Lookup asks, for each candidate replica, SMISMEMBER of the request's hashes (one pipeline, one
round trip); since hashes chain, a replica's cached prefix is the run of leading hits. Because the
state lives in Redis, a restarted router sees exactly what its predecessor saw.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import redis
import redis.asyncio as aredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .store import TierUnavailableError


def leading_hits(flags: Sequence[int | bool]) -> int:
    n = 0
    for f in flags:
        if not f:
            break
        n += 1
    return n


class PrefixIndex:
    def __init__(self, url: str, namespace: str, ttl_s: int = 120, socket_timeout_s: float = 0.1,
                 max_lookup_blocks: int = 4096) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        if not namespace:
            raise ValueError("PrefixIndex namespace must be a non-empty string (e.g. the model name)")
        self.url = url
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.max_lookup_blocks = max_lookup_blocks
        self._timeouts = dict(socket_timeout=socket_timeout_s,
                              socket_connect_timeout=socket_timeout_s)
        self.client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **self._timeouts)
        self._aclient: aredis.Redis | None = None

    def key(self, replica_id: str) -> bytes:
        return f"pidx:{self.namespace}:{replica_id}".encode()

    # -- replica side ---------------------------------------------------------------------------
    def publish(self, replica_id: str, added: Iterable[bytes] = (),
                removed: Iterable[bytes] = ()) -> None:
        """Record blocks that became cached (`added`) or were evicted (`removed`); refresh the TTL."""
        added, removed, key = list(added), list(removed), self.key(replica_id)
        self._run(lambda p: (removed and p.srem(key, *removed), added and p.sadd(key, *added),
                             p.expire(key, self.ttl_s)))

    def sync(self, replica_id: str, hashes: Iterable[bytes]) -> None:
        """Replace the replica's whole set with `hashes` (atomically: MULTI/EXEC)."""
        hashes, key = list(hashes), self.key(replica_id)
        self._run(lambda p: (p.delete(key), hashes and p.sadd(key, *hashes),
                             p.expire(key, self.ttl_s)), transaction=True)

    def heartbeat(self, replica_id: str) -> None:
        self._run(lambda p: p.expire(self.key(replica_id), self.ttl_s))

    def drop(self, replica_id: str) -> None:
        self._run(lambda p: p.delete(self.key(replica_id)))

    def _run(self, build, transaction: bool = False) -> list:
        try:
            pipe = self.client.pipeline(transaction=transaction)
            build(pipe)
            return pipe.execute()
        except (redis.RedisError, OSError) as e:
            raise TierUnavailableError(f"redis: {type(e).__name__}: {e}") from e

    # -- router side ----------------------------------------------------------------------------
    def lookup(self, block_hashes: Sequence[bytes], replica_ids: Sequence[str]) -> dict[str, int]:
        """{replica_id: number of leading blocks of `block_hashes` it holds} for each replica."""
        hashes = list(block_hashes[:self.max_lookup_blocks])
        if not hashes or not replica_ids:
            return {r: 0 for r in replica_ids}
        replies = self._run(lambda p: [p.smismember(self.key(r), hashes) for r in replica_ids])
        return {r: leading_hits(f) for r, f in zip(replica_ids, replies)}

    async def alookup(self, block_hashes: Sequence[bytes],
                      replica_ids: Sequence[str]) -> dict[str, int]:
        """`lookup` for an asyncio caller (the Serve router runs on the handle's event loop)."""
        hashes = list(block_hashes[:self.max_lookup_blocks])
        if not hashes or not replica_ids:
            return {r: 0 for r in replica_ids}
        if self._aclient is None:
            # Created lazily: a redis.asyncio client belongs to the loop it first runs on.
            self._aclient = aredis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0),
                                                  **self._timeouts)
        try:
            pipe = self._aclient.pipeline(transaction=False)
            for r in replica_ids:
                pipe.smismember(self.key(r), hashes)
            replies = await pipe.execute()
        except (redis.RedisError, OSError) as e:
            raise TierUnavailableError(f"redis: {type(e).__name__}: {e}") from e
        return {r: leading_hits(f) for r, f in zip(replica_ids, replies)}

    def close(self) -> None:
        self.client.close()
