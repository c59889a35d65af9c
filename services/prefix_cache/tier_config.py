"""The KV tier's configuration and the model fingerprint that keys its blocks."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .blob import ENCODINGS

WRITE_POLICIES = ("computed", "reused")   # services/config.py KV_TIER_WRITE_POLICIES spells them too


@dataclass(slots=True, frozen=True)
class KVTierConfig:
    redis_url: str = ""                 # "" = an in-process memory store (one replica, tests)
    memory_bytes: int = 256 * 2**20     # the memory store's bound
    ttl_s: int = 3600                   # Redis key TTL, refreshed on every read
    encoding: str = "raw"               # "raw" (exact) | "fp8" (half of bf16; see blob.py; raw over a float8 cache)
    socket_timeout_s: float = 0.25
    breaker_failures: int = 3           # consecutive failures that open the breaker
    breaker_cooldown_s: float = 2.0     # then a probe every cool-down
    max_queue_blocks: int = 512         # the writer's queue; beyond it, a step's blocks are dropped
    max_batch_blocks: int = 32          # blocks per pipelined write (a whole step's blocks at least)
    min_fetch_blocks: int = 1           # shorter missing runs are recomputed without asking
    load_timeout_s: float = 0.5         # a request held for its fetch then goes on without it
    # Which blocks go to the tier. "reused" (default) = a block on its first local prefix hit: only
    # what has proved shared is written, nothing at 0% hits (on the 2-core box, writing every block
    # costs 5-9% more CPU in the writer thread and redis-server, +4-7% wall time: README).
    # Prefix-aware routing sends a prefix's second request to the replica that computed it, which
    # then writes it, so a cold replica loads it from the third request on. "computed" = every full
    # block this replica computes (a cold replica can load anything): for replicas with spare CPU.
    write_policy: str = "reused"
    fetch_margin: float = 1.2           # fetch only if estimated fetch time * margin < recompute
    prior_prefill_tokens_per_s: float = 5_000.0   # until this replica has measured its own
    prior_bandwidth_bytes_per_s: float = 1e9
    prior_latency_s: float = 1e-3
    index_namespace: str = ""           # "" = do not publish a prefix index
    replica_id: str = ""                # this replica's id in the index (Serve's unique id)
    index_ttl_s: int = 120
    index_sync_interval_s: float = 10.0  # full re-publish (repairs evictions and lost updates)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"KVTierConfig.{name} must be {allowed}, got {getattr(self, name)!r}")

        need(self.encoding in ENCODINGS, "encoding", " or ".join(map(repr, ENCODINGS)))
        need(self.redis_url == "" or self.redis_url.startswith(("redis://", "rediss://", "unix://")),
             "redis_url", 'empty or a redis:// URL')
        need(self.memory_bytes > 0, "memory_bytes", "> 0")
        need(self.ttl_s > 0, "ttl_s", "> 0")
        need(self.socket_timeout_s > 0, "socket_timeout_s", "> 0")
        need(self.max_queue_blocks >= 1 and self.max_batch_blocks >= 1, "max_queue_blocks",
             ">= 1 (and max_batch_blocks >= 1)")
        need(self.min_fetch_blocks >= 1, "min_fetch_blocks", ">= 1")
        need(self.load_timeout_s > 0, "load_timeout_s", "> 0")
        need(self.write_policy in WRITE_POLICIES, "write_policy", " or ".join(map(repr, WRITE_POLICIES)))
        need(not self.index_namespace or bool(self.replica_id), "replica_id",
             "set when index_namespace is set")

    @property
    def tier_name(self) -> str:
        return "redis" if self.redis_url else "memory"


def model_fingerprint(model_dir: str, load_format: str = "auto", seed: int = 0) -> str:
    """Identifies the weights whose KV a block holds: config.json, plus, per weight file, its name,
    size and the first and last MiB (the safetensors header lists every tensor and its offsets).
    Random ("dummy") weights depend on the seed. Cheap on multi-GB checkpoints."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{load_format}:{seed if load_format == 'dummy' else ''}".encode())
    root = Path(model_dir)
    config = root / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    if load_format != "dummy":
        for f in sorted(root.glob("*.safetensors")):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(2**20))
                fh.seek(max(0, size - 2**20), os.SEEK_SET)
                h.update(fh.read(2**20))
    return h.hexdigest()
