"""PrefixLoader: the KV tier's read side. Looks up and fetches admitted requests' missing prefix
blocks on a background thread, so that no Redis round trip runs on the engine thread.

Engine thread:
  submit(request, hashes)  hold a request whose missing blocks may be in the tier (KVTier.begin_load
                           has already asked the cost model whether fetching could pay at all);
  ready(wait)              at the start of a step: hand the requests submitted since the previous
                           step to the loader thread as one batch (so one round trip per step, and
                           requests that arrived together are admitted together: a batch splits
                           into two prefill steps otherwise); import what has been fetched into
                           free cache blocks (registered under their hashes, so the scheduler's
                           ordinary prefix lookup hits them) and return the requests to queue, with
                           those whose deadline passed (they go on without their blocks). `wait`:
                           the engine has nothing else to do, so block briefly for the batch rather
                           than spin.
Loader thread, per batch (one round trip each, whatever the number of requests):
  1. EXISTS of each job's first missing block: hashes chain, so a job whose first missing block is
     absent can load nothing (the common case at 0% hits: one tiny command per request);
  2. EXISTS of the other missing blocks of the jobs that passed 1 -> the run each could load;
  3. the cost model per job, then one GET of every block to fetch; decode and check (CRC32 releases
     the GIL) into one tensor per job.

Invariants: only the engine thread touches the block manager and the KV tensors; the loader thread
only reads `BlockManager.cached` (a dict: membership tests are atomic). Blocks a job is fetching are
"claimed": later jobs treat them as local (so two requests with one prefix fetch it once) until the
engine imports them or drops the job; such a job is done only with its batch, after those blocks were fetched
(one loader thread, batches in order), and the engine imports done jobs in submission order, so they are
cached before its request is queued. An import re-checks the chain on the engine thread: blocks that
no longer continue the request's cached prefix are dropped, never registered.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from services.telemetry import metrics

from .blob import BlobError
from .index import leading_hits

log = logging.getLogger(__name__)
_MAX_IDLE_WAIT_S = 0.01   # an idle engine waits at most this long per step, so it still sees new requests


@dataclass(slots=True, eq=False)
class LoadJob:
    request: object
    hashes: list[bytes]             # the request's full blocks that a prefix hit may cover
    deadline: float                 # time.monotonic(): the request then goes on without the fetch
    start: int = 0                  # hashes[start:start + len(fetched)] were fetched
    fetched: torch.Tensor | None = None   # [n, *layout.shape], checked
    claimed: list[bytes] = field(default_factory=list)
    done: bool = False              # the loader thread is finished with it
    released: bool = False          # its request went back to the engine before the job was done


class PrefixLoader:
    def __init__(self, tier, timeout_s: float) -> None:
        self._tier = tier
        self._timeout_s = timeout_s
        self._cond = threading.Condition()
        self._new: list[LoadJob] = []        # engine thread: submitted since the last ready()
        self._todo: list[LoadJob] = []       # handed to the loader thread, not yet taken by it
        self._jobs: list[LoadJob] = []       # engine thread: not yet retired, in submission order
        self._claimed: set[bytes] = set()
        self._closed = False
        self.num_timeouts = 0
        self._thread = threading.Thread(target=self._run, name="kv-tier-loader", daemon=True)
        self._thread.start()

    @property
    def num_held(self) -> int:
        """Requests held for their fetch (not yet handed back to the engine)."""
        return sum(not j.released for j in self._jobs)

    # ---- engine thread -----------------------------------------------------------------------
    def submit(self, request, hashes: list[bytes]) -> bool:
        if self._closed:
            return False
        job = LoadJob(request, hashes, time.monotonic() + self._timeout_s)
        self._new.append(job)
        self._jobs.append(job)
        return True

    def ready(self, wait: bool = False) -> list:
        if not self._jobs:
            return []
        with self._cond:
            if self._new:
                self._todo.extend(self._new)
                self._new = []
                self._cond.notify_all()
            held = [j for j in self._jobs if not j.released]
            if wait and held and not any(j.done for j in self._jobs):
                timeout = min(j.deadline for j in held) - time.monotonic()
                self._cond.wait(min(max(timeout, 0.0), _MAX_IDLE_WAIT_S))
            done = [j for j in self._jobs if j.done]
        now, out = time.monotonic(), []
        for job in done:
            if not job.released:
                self._import(job)
                out.append(job.request)
            with self._cond:
                self._claimed.difference_update(job.claimed)
        for job in self._jobs:
            if not job.done and not job.released and now >= job.deadline:
                job.released = True
                self.num_timeouts += 1
                out.append(job.request)
        self._jobs = [j for j in self._jobs if not j.done]
        return [r for r in out if not r.is_finished]    # aborted while held: nothing to queue

    def _import(self, job: LoadJob) -> None:
        if job.fetched is None:
            return
        tier, kv = self._tier, self._tier.kv
        num_local = leading_hits([h in kv.cached for h in job.hashes])
        skip, n = num_local - job.start, len(job.fetched)
        if skip < 0:       # a hole before the fetched run (say an earlier job's blocks were not
            tier.count_blocks("miss", n)   # imported): they would not continue the chain
            return
        if skip >= n:      # all of it was computed here meanwhile
            return
        new = job.hashes[num_local:job.start + n]
        ids = kv.import_cached_blocks(job.hashes[:num_local], new)
        if ids:
            tier.runner.import_blocks(ids, job.fetched[skip:skip + len(ids)])
            tier.loaded(new[:len(ids)])
        tier.count_blocks("hit", len(ids))
        tier.count_blocks("miss", n - skip - len(ids))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(5.0)

    # ---- loader thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._todo and not self._closed:
                    self._cond.wait()
                if not self._todo:
                    return
                batch, self._todo = self._todo, []
            try:
                self._load(batch)
            except Exception:   # a bug here must not strand the held requests
                log.exception("KV tier loader failed on a batch of %d requests; they recompute", len(batch))
                for job in batch:
                    job.fetched = None
            finally:
                with self._cond:
                    for job in batch:
                        job.done = True
                    self._cond.notify_all()

    def _local_run(self, hashes: list[bytes], claimed: set[bytes]) -> int:
        cached = self._tier.kv.cached
        return leading_hits([h in cached or h in claimed for h in hashes])

    def _load(self, batch: list[LoadJob]) -> None:
        tier, min_blocks = self._tier, self._tier.config.min_fetch_blocks
        with self._cond:
            claimed = set(self._claimed)
        for job in batch:
            job.start = self._local_run(job.hashes, claimed)
        jobs = [j for j in batch if len(j.hashes) - j.start >= min_blocks]
        if not jobs:
            return
        # 1. the first missing block of each job
        present = self._exists([tier.key(j.hashes[j.start]) for j in jobs])
        if present is None:
            return
        for job, p in zip(jobs, present):
            if not p:
                tier.count_blocks("miss", len(job.hashes) - job.start)
        self._finish([j for j in batch if j not in jobs] + [j for j, p in zip(jobs, present) if not p], claimed)
        jobs = [j for j, p in zip(jobs, present) if p]
        if not jobs:
            return
        # 2. the rest of their missing blocks
        rest = [tier.key(h) for j in jobs for h in j.hashes[j.start + 1:]]
        flags = self._exists(rest) if rest else []
        if flags is None:
            return
        # 3. decide per job (blocks an earlier job fetches count as local), then one GET for all
        fetches, i = [], 0
        for job in jobs:
            known = [True, *flags[i:i + len(job.hashes) - job.start - 1]]   # from hashes[job.start]
            i += len(job.hashes) - job.start - 1
            # Later than job.start if an earlier job fetches blocks this one misses; never earlier
            # (a local block evicted meanwhile leaves a hole: the import will find it).
            start = max(self._local_run(job.hashes, claimed), job.start)
            run = leading_hits(known[start - job.start:])
            tier.count_blocks("miss", len(job.hashes) - start - run)
            job.start = start
            if run < min_blocks:
                continue
            decision = tier.cost.decide(run, tier.block_size, tier.blob_bytes_per_block)
            span = tier.decided(job.request, decision)
            if not decision.fetch:
                tier.count_blocks("skipped", run)
                continue
            job.claimed = job.hashes[start:start + run]
            claimed.update(job.claimed)
            fetches.append((job, span))
        fetching = {id(job) for job, _ in fetches}
        self._finish([j for j in jobs if id(j) not in fetching], claimed)
        if fetches:
            with self._cond:
                for job, _ in fetches:
                    self._claimed.update(job.claimed)
            self._fetch(fetches)

    def _finish(self, jobs: list[LoadJob], claimed: set[bytes]) -> None:
        """Release jobs of a batch that have nothing more to do (no need to wait for its fetches), except
        those whose prefix runs through blocks another job is fetching: they wait for the batch, so that
        those blocks are imported before their requests are scheduled (and hit, not computed again)."""
        cached = self._tier.kv.cached
        jobs = [j for j in jobs if not any(h in claimed and h not in cached for h in j.hashes[:j.start])]
        if jobs:
            with self._cond:
                for job in jobs:
                    job.done = True
                self._cond.notify_all()

    def _exists(self, keys: list[bytes]) -> list[bool] | None:
        t0 = time.perf_counter()
        present = self._tier.store.try_contains_many(keys)
        if present is None:
            self._tier.bypass_read()
            return None
        self._tier.cost.observe_transfer(0, time.perf_counter() - t0)
        return present

    def _fetch(self, fetches: list) -> None:
        tier = self._tier
        keys = [tier.key(h) for job, _ in fetches for h in job.claimed]
        t0 = time.perf_counter()
        blobs = tier.store.try_get_many(keys)
        if blobs is None:
            tier.bypass_read()
            for _, span in fetches:
                span.end()
            return
        num_bytes, i, corrupt = 0, 0, []
        for job, span in fetches:
            blocks, bad = [], 0
            for h, k, blob in zip(job.claimed, keys[i:], blobs[i:]):
                if blob is None:            # evicted between EXISTS and GET: the run ends here
                    break
                try:
                    blocks.append(tier.codec.decode(h, blob))
                except BlobError as e:
                    log.warning("KV tier block %s rejected, recomputing: %s", h.hex(), e)
                    corrupt.append(k)
                    bad = 1
                    break
                num_bytes += len(blob)
            i += len(job.claimed)
            tier.count_blocks("miss", len(job.claimed) - len(blocks) - bad)
            if blocks:
                job.fetched = torch.stack(blocks)
            span.set_attribute("kv_tier.blocks_fetched", len(blocks))
            span.end()
        if corrupt:
            tier.count_blocks("corrupt", len(corrupt))
            tier.store.delete_many(corrupt)
        seconds = time.perf_counter() - t0
        tier.cost.observe_transfer(num_bytes, seconds)
        tier.count_bytes("read", num_bytes)
        metrics.KV_TIER_FETCH_SECONDS.labels(tier.name).observe(seconds)
