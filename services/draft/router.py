"""Sticky routing for the DraftServer: each sequence shard always goes to the same replica.

A draft replica keeps a sequence's tokens and KV between calls, so a sequence must come back to
it. Callers group sequences into shards (crc32(request id) mod num_shards) and pass the shard as
the keyword `shard_key`; this router ranks replicas by rendezvous (highest-random-weight) hashing
of (shard, replica id). When replicas come or go only the shards of the changed replica move;
a moved sequence is answered `lost` once and resent in full (services/draft/protocol.py).
Wiring: RequestRouterConfig(request_router_class="services.draft.router.StickyRouter").
"""
from __future__ import annotations

import hashlib
import zlib

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTING_KWARG = "shard_key"


def shard_of(request_id: str, num_shards: int) -> int:
    return zlib.crc32(request_id.encode()) % num_shards


def _weight(shard: int, replica_key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{shard}:{replica_key}".encode(), digest_size=8).digest(), "big")


def rank_replicas(shard: int, replica_keys: list[str]) -> list[str]:
    """Rendezvous order of replicas for a shard: the first is its home, the rest are fallbacks."""
    return sorted(replica_keys, key=lambda key: _weight(shard, key), reverse=True)


class StickyRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        shard = (pending_request.kwargs or {}).get(ROUTING_KWARG) if pending_request is not None else None
        if shard is None:
            return [candidate_replicas]
        by_key = {r.replica_id.unique_id: r for r in candidate_replicas}
        # One rank per replica: Ray tries the home replica first and falls through only if it refuses.
        return [[by_key[key]] for key in rank_replicas(int(shard), list(by_key))]
