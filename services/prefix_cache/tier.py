"""KVTier: the engine's side of the shared KV tier (and of the prefix index the router reads).

Calls from the engine, all on its thread, none of which waits on the network:
  on_block_full(block_id, hash)  the block manager's callback: the block will hold committed KV
                                 after this step (registered, not yet computed);
  after_step(scheduled, secs)    after the forward pass: copy the blocks to write out of the cache
                                 (one gather per step, layer-major: write_policy "computed" = those
                                 that just became full, "reused" = those hit on admission) and queue
                                 them for the writer thread; measure prefill speed;
  begin_load(request)            on admission: if the request's missing full blocks could be worth
                                 fetching (cost model, no round trip), hold it while the loader
                                 thread looks them up and fetches them (loader.py); False = queue it;
  ready(wait)                    at the start of a step: import fetched blocks, return the held
                                 requests to queue.
Everything that can wait (encoding, checksums, Redis writes, index updates) runs on the writer
thread; lookups and fetches on the loader thread. A failing backend costs at most one socket timeout
per breaker trip before the breaker bypasses it, and never blocks the engine thread.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from services.telemetry import metrics
from services.telemetry.tracing import start_span

from .blob import BlockCodec, KVLayout
from .breaker import CircuitBreaker
from .cost_model import CostDecision, CostModel
from .index import PrefixIndex, leading_hits
from .loader import PrefixLoader
from .store import GuardedStore, KVTierStore, MemoryKVStore, RedisKVStore, TierUnavailableError, block_key
from .tier_config import KVTierConfig, model_fingerprint
from .writer import AsyncWriter

log = logging.getLogger(__name__)
_KNOWN_MAX = 65536           # hashes remembered as already in the tier (skip exporting them again)
_MIN_PREFILL_SAMPLE = 32     # steps with fewer prefill tokens say little about prefill speed


@dataclass(slots=True)
class TierStats:
    blocks_hit: int = 0
    blocks_miss: int = 0
    blocks_corrupt: int = 0
    blocks_skipped: int = 0
    blocks_exported: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    read_bypasses: int = 0
    write_bypasses: int = 0
    index_bypasses: int = 0
    decisions_fetch: int = 0
    decisions_recompute: int = 0


class KVTier:
    def __init__(self, config: KVTierConfig, store: KVTierStore | None = None,
                 index: PrefixIndex | None = None) -> None:
        self.config = config
        self.name = config.tier_name
        self.stats = TierStats()
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s,
                                      on_state_change=lambda s: metrics.KV_TIER_BREAKER_OPEN.labels(
                                          self.name).set(0 if s == "closed" else 1))
        if store is None:
            store = (RedisKVStore(config.redis_url, config.ttl_s, config.socket_timeout_s,
                                  config.socket_timeout_s) if config.redis_url
                     else MemoryKVStore(config.memory_bytes))
        inner = store
        self.store = GuardedStore(inner, self.breaker)
        self.index = index if index is not None else (PrefixIndex(config.redis_url, config.index_namespace,
                                           config.index_ttl_s, config.socket_timeout_s)
                               if config.index_namespace and config.redis_url else None)
        self.cost = CostModel(config.prior_latency_s, config.prior_bandwidth_bytes_per_s,
                              config.prior_prefill_tokens_per_s, margin=config.fetch_margin)
        self.writer = AsyncWriter(self._write, config.max_queue_blocks, config.max_batch_blocks)
        self.loader = PrefixLoader(self, config.load_timeout_s)
        self.last_decision: CostDecision | None = None
        self._known: OrderedDict[bytes, None] = OrderedDict()
        self._pending: list[tuple[int, bytes]] = []   # (block id, hash): full after this step
        self._reused: list[tuple[int, bytes]] = []    # (block id, hash): hit on admission ("reused")
        self._last_sync = 0.0
        self._evictions_seen: int | None = None
        self._evictions_checked = 0.0
        self._warm = False
        self._stats_lock = threading.Lock()   # three threads count
        self.kv = self.runner = self.codec = None

    # ---- wiring ------------------------------------------------------------------------------
    def attach(self, block_manager, runner, engine_config) -> None:
        """Bind to one engine: its block manager (hashes, free blocks) and model runner (tensors)."""
        self.kv, self.runner = block_manager, runner
        self.block_size = block_manager.block_size
        layout = KVLayout("LKBHD", (runner.num_layers, 2, runner.block_size, runner.num_kv_heads,
                                    runner.head_dim), str(runner.kv_dtype).removeprefix("torch."))
        fp = model_fingerprint(engine_config.model, engine_config.load_format, engine_config.seed)
        encoding = self.config.encoding
        if encoding == "fp8" and runner.kv_dtype.itemsize == 1:   # re-quantizing a float8 cache only loses
            log.info("KV tier: the engine's KV cache is float8 already; its blocks are stored raw, not fp8-encoded")
            encoding = "raw"
        self.codec = BlockCodec(layout, fp, encoding)
        self._key_prefix = block_key(fp, layout.fingerprint, b"")
        self.blob_bytes_per_block = len(self.codec.encode(b"\0" * 16, torch.zeros(layout.shape,
                                                                                  dtype=layout.torch_dtype)))
        block_manager.on_block_full = self.on_block_full
        # Open the connection now: a first round trip that pays for TCP setup would teach the cost
        # model a latency ten times the real one, and the first request would recompute.
        self.store.try_contains_many([self.key(b"\0" * 16)])

    def key(self, block_hash: bytes) -> bytes:
        return self._key_prefix + block_hash.hex().encode()

    # ---- write side (engine thread, then the writer thread) ------------------------------------
    def on_block_full(self, block_id: int, block_hash: bytes) -> None:
        self._pending.append((block_id, block_hash))

    def after_step(self, scheduled, seconds: float) -> None:
        num_prefill = sum(s.num_new_tokens for s in scheduled if s.num_new_tokens > 1)
        if num_prefill >= _MIN_PREFILL_SAMPLE:
            if self._warm:
                self.cost.observe_prefill(sum(s.num_new_tokens for s in scheduled), seconds)
            self._warm = True   # an engine's first prefill pays one-off allocations: not a sample
        pending, self._pending = self._pending, []
        reused, self._reused = self._reused, []
        valid = []
        if pending and (self.config.write_policy == "computed" or self.index is not None):
            computed = {b for s in scheduled for b in s.block_ids}
            # Only blocks this step computed and that still carry their hash hold the KV we name.
            valid = [(b, h) for b, h in pending
                     if b in computed and self.kv.blocks[b].block_hash == h]
            if self.index is not None:
                self.writer.submit(("index", [h for _, h in valid], None))
        if self.config.write_policy == "computed":
            write = valid
        else:
            # "reused": hit blocks are never written again while cached, so a block still under its
            # hash holds the KV it held when it was hit (one evicted meanwhile has lost or changed it).
            write = [(b, h) for b, h in reused if self.kv.blocks[b].block_hash == h]
        if write:
            self._export([(b, h) for b, h in dict(write).items() if h not in self._known])
        if self.index is not None and time.monotonic() - self._last_sync > self.config.index_sync_interval_s:
            self._last_sync = time.monotonic()
            self.writer.submit(("sync", list(self.kv.cached), None))

    def _export(self, blocks: list[tuple[int, bytes]]) -> None:
        """Copy the blocks' KV out of the cache and queue it for the writer: one copy per step. When
        the writer is backed up, the blocks it has no room for are neither copied nor written
        (dropped and counted); a request's blocks come in chain order, so its head goes first."""
        room = self.writer.room
        if len(blocks) > room:
            self.writer.count_dropped(len(blocks) - room)
            metrics.KV_TIER_WRITES_DROPPED.labels(self.name).inc(len(blocks) - room)
            blocks = blocks[:room]
        if not blocks:
            return
        hashes = [h for _, h in blocks]
        data = self.runner.export_blocks([b for b, _ in blocks])
        if not self.writer.submit(("kv", hashes, data), weight=len(blocks)):
            metrics.KV_TIER_WRITES_DROPPED.labels(self.name).inc(len(blocks))
            return
        self._count("blocks_exported", len(blocks))
        for h in hashes:
            self._remember(h)

    def _write(self, items: list) -> None:
        """The writer thread: encode (one copy and a CRC per block, GIL mostly released) and write
        the batch's blocks in one pipeline; update the index."""
        blocks = []
        for kind, hashes, data in items:
            if kind == "kv":
                data, copied = data
                if copied is not None:
                    copied.synchronize()
                blobs = self.codec.encode_batch(hashes, data.permute(2, 0, 1, 3, 4, 5))
                blocks.extend(zip([self.key(h) for h in hashes], blobs))
        if blocks:
            t0 = time.perf_counter()
            written = self.store.try_put_many(blocks)
            if written is None:
                self._count("write_bypasses", len(blocks))
                metrics.KV_TIER_BYPASSES.labels(self.name, "write").inc()
            elif written:
                self.cost.observe_transfer(written, time.perf_counter() - t0)
                self.count_bytes("write", written)
        added = [h for kind, hs, _ in items if kind == "index" for h in hs]
        syncs = [hs for kind, hs, _ in items if kind == "sync"]
        if added or syncs:
            self._update_index(added, syncs[-1] if syncs else None)
        self._count_evictions()

    def _update_index(self, added: list[bytes], full: list[bytes] | None) -> None:
        if not self.breaker.allow():
            self._count("index_bypasses", 1)
            metrics.KV_TIER_BYPASSES.labels(self.name, "index").inc()
            return
        try:
            if full is not None:
                self.index.sync(self.config.replica_id, full)
            if added:
                self.index.publish(self.config.replica_id, added)
        except TierUnavailableError as e:
            self.breaker.record_failure()
            self._count("index_bypasses", 1)
            metrics.KV_TIER_BYPASSES.labels(self.name, "index").inc()
            log.warning("prefix index update skipped: %s", e)
            return
        self.breaker.record_success()

    def _count_evictions(self) -> None:
        if time.monotonic() - self._evictions_checked < 5.0:   # one INFO round trip per 5 s at most
            return
        self._evictions_checked = time.monotonic()
        n = self.store.num_evictions()
        if n is not None:
            if self._evictions_seen is not None and n > self._evictions_seen:
                metrics.KV_TIER_EVICTIONS.labels(self.name).inc(n - self._evictions_seen)
            self._evictions_seen = n

    def _remember(self, h: bytes) -> None:
        self._known[h] = None
        self._known.move_to_end(h)
        if len(self._known) > _KNOWN_MAX:
            self._known.popitem(last=False)

    # ---- read side (engine thread; the round trips run on the loader thread) ------------------
    def begin_load(self, request) -> bool:
        """On admission. True: the tier holds the request while the loader thread looks up (and
        maybe fetches) its missing prefix blocks; `ready` hands it back. False: queue it now."""
        kv = self.kv
        hashes = request.block_hashes[:(request.num_tokens - 1) // self.block_size]
        num_local = leading_hits([h in kv.cached for h in hashes])
        if self.config.write_policy == "reused" and num_local:
            # Write on first reuse: these cached blocks just proved useful. after_step copies them
            # with the step's other blocks, off the admission path.
            self._reused.extend((kv.cached[h].block_id, h) for h in hashes[:num_local] if h not in self._known)
        missing = len(hashes) - num_local
        if missing < self.config.min_fetch_blocks:
            return False
        # If fetching every missing block would not pay, no shorter run would (the round trip's
        # latency is shared by fewer blocks): decide without asking Redis at all.
        upper = self.cost.decide(missing, self.block_size, self.blob_bytes_per_block)
        if not upper.fetch:
            self.decided(request, upper)
            return False
        if self.breaker.bypassing():
            self.bypass_read()
            return False
        return self.loader.submit(request, list(hashes))

    def ready(self, wait: bool = False) -> list:
        """Held requests to queue now (their blocks imported, or their deadline passed). `wait`:
        the engine is idle, so wait a little for a fetch to end instead of spinning."""
        return self.loader.ready(wait)

    # ---- bookkeeping shared by the engine, loader and writer threads --------------------------
    def loaded(self, hashes: list[bytes]) -> None:
        """Blocks imported from the tier (engine thread): known to be there; now held here too."""
        for h in hashes:
            self._remember(h)
        if self.index is not None:
            self.writer.submit(("index", hashes, None))

    def decided(self, request, decision: CostDecision):
        """Record a decision (stats, metrics, a span with its inputs); returns the span, ended at
        once for a recompute, by the caller after the fetch otherwise."""
        self.last_decision = decision
        kind = "fetch" if decision.fetch else "recompute"
        self._count(f"decisions_{kind}", 1)
        metrics.KV_TIER_DECISIONS.labels(self.name, kind).inc()
        span = start_span("kv_tier.load", attributes={"inference.request_id": request.request_id,
                                                       **decision.as_attributes()})
        if not decision.fetch:
            span.end()
        return span

    def bypass_read(self) -> None:
        self._count("read_bypasses", 1)
        metrics.KV_TIER_BYPASSES.labels(self.name, "read").inc()

    def count_blocks(self, result: str, n: int) -> None:
        if n > 0:
            self._count(f"blocks_{result}", n)
            metrics.KV_TIER_BLOCKS.labels(self.name, result).inc(n)

    def count_bytes(self, direction: str, n: int) -> None:
        self._count(f"bytes_{'read' if direction == 'read' else 'written'}", n)
        metrics.KV_TIER_BYTES.labels(self.name, direction).inc(n)

    def _count(self, field: str, n: int) -> None:
        with self._stats_lock:
            setattr(self.stats, field, getattr(self.stats, field) + n)

    def close(self) -> None:
        self.loader.close()
        self.writer.close()
        self.store.close()
        if self.index is not None:
            self.index.close()


def kv_tier_for_replica(redis_url: str, namespace: str, replica_id: str, **overrides) -> KVTier | None:
    """The tier of one serving replica: Redis-backed, publishing the prefix index that the router
    (services.prefix_cache.router, same `namespace`) reads; None without Redis."""
    if not redis_url:
        return None
    return KVTier(KVTierConfig(redis_url=redis_url, index_namespace=namespace, replica_id=replica_id,
                               **overrides))
