"""Prefix-aware request routing for the LLMServer deployment (Ray Serve's public RequestRouter API).

How a request carries its prefix: the gateway computes the salted block hashes of the prompt
(services/prefix_cache/hashing.py) and passes them to the LLMServer call as the keyword argument
`prefix_block_hashes: list[bytes]` (or as an attribute / dict key of that name on the first
positional argument). The LLMServer method accepts that keyword (it may ignore it).

Policy, per request, among the candidate replicas whose queues are not full:
  score(r) = cached_prefix_blocks(r) - queue_penalty_blocks * queue_len(r)
The best-scoring replica is the first rank, the rest follow in score order, so Ray falls through to
the next if the first rejects. A replica with a long prefix wins until its queue is long enough
that waiting costs more than recomputing; one hot prefix cannot pile up on one replica.
With no useful prefix (none holds `min_prefix_blocks`), the index unreachable or no hashes given,
it is power-of-two-choices by queue length. Queue lengths come from Ray's cache of what replicas
reported; unknown counts as empty (Ray probes the chosen rank before sending anyway).

State: the prefix index lives in Redis (services/prefix_cache/index.py), so a restarted gateway
routes exactly as before. Wiring:
    RequestRouterConfig(request_router_class="services.prefix_cache.router.PrefixAwareRouter",
                        request_router_kwargs={"redis_url": ..., "namespace": ...})
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from services.telemetry import metrics

from .breaker import CircuitBreaker
from .index import PrefixIndex
from .store import TierUnavailableError

ROUTING_KWARG = "prefix_block_hashes"
log = logging.getLogger(__name__)


def request_block_hashes(pending_request: PendingRequest | None) -> list[bytes] | None:
    """The block hashes a request carries, or None."""
    if pending_request is None:
        return None
    hashes = (pending_request.kwargs or {}).get(ROUTING_KWARG)
    if hashes is None and pending_request.args:
        first = pending_request.args[0]
        hashes = first.get(ROUTING_KWARG) if isinstance(first, dict) else getattr(
            first, ROUTING_KWARG, None)
    return list(hashes) if hashes else None


@dataclass(slots=True, frozen=True)
class RouteDecision:
    reason: str                       # "prefix" | "load" (no useful prefix) | "no_hashes" | "index_down"
    prefix_blocks: dict[str, int]     # replica unique id -> cached leading blocks
    lookup_s: float


class PrefixAwareRouter(RequestRouter):
    def initialize_state(self, redis_url: str = "", namespace: str = "default",
                         queue_penalty_blocks: float = 4.0, min_prefix_blocks: int = 1,
                         index_ttl_s: int = 120, socket_timeout_s: float = 0.05,
                         index: PrefixIndex | None = None) -> None:
        if queue_penalty_blocks < 0:
            raise ValueError(f"queue_penalty_blocks must be >= 0, got {queue_penalty_blocks}")
        if min_prefix_blocks < 1:
            raise ValueError(f"min_prefix_blocks must be >= 1, got {min_prefix_blocks}")
        self.queue_penalty_blocks = queue_penalty_blocks
        self.min_prefix_blocks = min_prefix_blocks
        self.index = index if index is not None else (
            PrefixIndex(redis_url, namespace, ttl_s=index_ttl_s, socket_timeout_s=socket_timeout_s)
            if redis_url else None)
        # An unreachable index must not add its timeout to every request: bypass it for a while.
        self.breaker = CircuitBreaker(failure_threshold=3, cooldown_s=5.0)
        self.last_decision: RouteDecision | None = None
        self.num_decisions: dict[str, int] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # We consider every replica on every attempt, so Ray should back off between attempts
            # (the locality mixin would set this; we do not use it).
            pending_request.routing_context.should_backoff = True
        available = self.select_available_replicas(candidate_replicas)
        # Replicas the queue-length cache reports full go last rather than nowhere: Ray re-probes
        # them, so a stale "full" entry cannot starve a replica.
        full = [r for r in candidate_replicas if r not in available]
        pool = available or list(candidate_replicas)
        prefix_blocks, reason, lookup_s = await self._lookup(pool, pending_request)
        if reason == "prefix":
            ranked = self._rank_by_prefix(pool, prefix_blocks)
        else:
            ranked = [self._two_choices(pool)]
        self._record(RouteDecision(reason, prefix_blocks, lookup_s), ranked[0][0])
        return ranked + ([full] if full and available else [])

    async def _lookup(self, replicas: Sequence[RunningReplica], pending_request
                      ) -> tuple[dict[str, int], str, float]:
        hashes = request_block_hashes(pending_request)
        if not hashes or getattr(self, "index", None) is None:
            return {}, "no_hashes", 0.0
        if not self.breaker.allow():
            return {}, "index_down", 0.0
        t0 = time.perf_counter()
        try:
            found = await self.index.alookup(hashes, [r.replica_id.unique_id for r in replicas])
        except TierUnavailableError as e:
            self.breaker.record_failure()
            log.warning("prefix index unavailable, routing by load: %s", e)
            return {}, "index_down", time.perf_counter() - t0
        self.breaker.record_success()
        useful = max(found.values(), default=0) >= self.min_prefix_blocks
        return found, ("prefix" if useful else "load"), time.perf_counter() - t0

    def _queue_len(self, r: RunningReplica) -> int:
        q = self.replica_queue_len_cache.get(r.replica_id)
        return 0 if q is None else q

    def _rank_by_prefix(self, replicas: Sequence[RunningReplica],
                        prefix_blocks: dict[str, int]) -> list[list[RunningReplica]]:
        def score(r: RunningReplica) -> float:
            return (prefix_blocks.get(r.replica_id.unique_id, 0)
                    - self.queue_penalty_blocks * self._queue_len(r))

        shuffled = list(replicas)
        random.shuffle(shuffled)            # ties go to a random replica, not the first listed
        return [[r] for r in sorted(shuffled, key=score, reverse=True)]

    @staticmethod
    def _two_choices(replicas: Sequence[RunningReplica]) -> list[RunningReplica]:
        # Ray picks the shorter queue within a rank: power of two choices.
        return random.sample(list(replicas), k=min(2, len(replicas)))

    def _record(self, decision: RouteDecision, chosen: RunningReplica) -> None:
        self.last_decision = decision
        self.num_decisions[decision.reason] = self.num_decisions.get(decision.reason, 0) + 1
        metrics.PREFIX_ROUTER_DECISIONS.labels(decision.reason).inc()
        if decision.lookup_s:
            metrics.PREFIX_ROUTER_LOOKUP_SECONDS.observe(decision.lookup_s)
        if decision.reason == "prefix":
            metrics.PREFIX_ROUTER_MATCHED_BLOCKS.observe(
                decision.prefix_blocks.get(chosen.replica_id.unique_id, 0))
