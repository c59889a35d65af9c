"""Block accounting under random arrivals, lengths and aborts (hypothesis), driven through the real
scheduler with a model-free executor: no leaks, no double frees, shared blocks never written."""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.outputs import RequestMetrics
from services.engine.request import Request, RequestStatus
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler

BS = 4


def make_request(i: int, prompt: list[int], max_tokens: int, priority: int = 0, salt: str | None = None) -> Request:
    return Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens), frozenset(), 256, BS,
                   RequestMetrics(0.0), priority=priority, cache_salt=salt, arrival_seq=i)


def run_step(sched: Scheduler, kv: BlockManager, rng: random.Random) -> list[Request]:
    computed_before = {b.block_id: b.block_hash for b in kv.blocks if b.block_hash is not None}
    out = sched.schedule()
    writer: dict[int, str] = {}
    for s in out.scheduled:
        r = s.request
        for pos in range(r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens):
            block = kv.blocks[s.block_ids[pos // BS]]
            # One writer per block per step, and never a block whose KV was already complete (shared).
            assert writer.setdefault(block.block_id, r.request_id) == r.request_id, f"block {block.block_id}"
            assert computed_before.get(block.block_id, object()) != block.block_hash, \
                f"{r.request_id} overwrites cached block {block.block_id}"
    sched.update(out.scheduled)
    finished = []
    for s in out.scheduled:
        r = s.request
        if s.samples:
            r.append_token(rng.randrange(8))   # a tiny alphabet: lots of shared prefixes
            if r.num_output_tokens >= r.max_tokens:
                sched.finish(r, RequestStatus.FINISHED_LENGTH)
                finished.append(r)
    kv.check_invariants()
    return finished


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(8, 40), budget=st.sampled_from([4, 7, 16, 64]),
       chunked=st.booleans(), n_requests=st.integers(1, 12))
def test_random_workloads_never_leak(seed, num_blocks, budget, chunked, n_requests):
    rng = random.Random(seed)
    cfg = EngineConfig(load_format="dummy", block_size=BS, max_num_seqs=6, max_num_batched_tokens=max(budget, BS),
                       enable_chunked_prefill=chunked)
    kv = BlockManager(num_blocks, BS)
    sched = Scheduler(cfg, kv, max_model_len=256)
    shared = [rng.randrange(8) for _ in range(12)]
    pending = []
    for i in range(n_requests):
        prompt = (shared[:rng.randrange(0, 12)] + [rng.randrange(8) for _ in range(rng.randrange(1, 14))])
        pending.append(make_request(i, prompt, rng.randrange(1, 10), priority=rng.randrange(3),
                                    salt=rng.choice([None, "tenant-a"])))
    live: dict[str, Request] = {}
    for _ in range(400):
        if pending and rng.random() < 0.5:
            r = pending.pop()
            # A request that could never fit is rejected up front by the engine's validation.
            if -(-(r.num_tokens + r.max_tokens) // BS) <= num_blocks:
                sched.add(r)
                live[r.request_id] = r
        if live and rng.random() < 0.1:   # abort anything, running or waiting
            r = live.pop(rng.choice(sorted(live)))
            sched.finish(r, RequestStatus.FINISHED_ABORTED)
            kv.check_invariants()
        for r in run_step(sched, kv, rng):
            live.pop(r.request_id, None)
        if not pending and not live:
            break
    for r in list(live.values()):
        sched.finish(r, RequestStatus.FINISHED_ABORTED)
    kv.check_invariants()
    assert kv.num_free_blocks == kv.num_blocks
    assert sched.num_running == 0 and sched.num_waiting == 0


def test_prefix_blocks_are_shared_and_salted():
    kv = BlockManager(16, BS)
    cfg = EngineConfig(load_format="dummy", block_size=BS)
    sched = Scheduler(cfg, kv, 256)
    prompt = list(range(10))
    a = make_request(0, prompt, 2)
    sched.add(a)
    run_step(sched, kv, random.Random(0))
    b = make_request(1, prompt, 2)
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and [h.block_id for h in hits] == kv.block_ids("r0")[:2]
    other_tenant = make_request(2, prompt, 2, salt="tenant-b")
    assert kv.get_computed_blocks(other_tenant) == ([], 0)


def test_freed_cached_blocks_are_evicted_in_lru_order():
    kv = BlockManager(4, BS)
    cfg = EngineConfig(load_format="dummy", block_size=BS)
    sched = Scheduler(cfg, kv, 256)
    first = make_request(0, list(range(9)), 1)
    sched.add(first)
    run_step(sched, kv, random.Random(0))        # 3 blocks, 2 full and registered, then finished
    assert kv.num_free_blocks == 4 and len(kv.cached) == 2
    second = make_request(1, list(range(50, 59)), 1)   # 3 blocks: the two never hashed, then the LRU one
    sched.add(second)
    run_step(sched, kv, random.Random(0))
    # The prompt's first block (freed last: tail blocks are freed first) survives eviction.
    assert kv.get_computed_blocks(make_request(2, list(range(9)), 1))[1] == 4


def test_preemption_picks_lowest_priority_latest_and_resumes():
    kv = BlockManager(6, BS)
    cfg = EngineConfig(load_format="dummy", block_size=BS, max_num_batched_tokens=64)
    sched = Scheduler(cfg, kv, 256)
    low = make_request(0, list(range(8)), 12, priority=0)
    high = make_request(1, list(range(100, 108)), 12, priority=5)
    sched.add(low)
    sched.add(high)
    rng = random.Random(0)
    preempted = False
    for _ in range(60):
        out_before = sched.num_preemptions
        run_step(sched, kv, rng)
        preempted |= sched.num_preemptions > out_before and low.metrics.num_preemptions > 0
        if low.is_finished and high.is_finished:
            break
    assert preempted and high.metrics.num_preemptions == 0
    assert low.is_finished and high.is_finished
    assert kv.num_free_blocks == kv.num_blocks
