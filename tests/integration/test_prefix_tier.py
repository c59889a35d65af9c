"""The KV tier inside the engine, on the tiny model and a real Redis: greedy outputs are identical with
the tier off, with local prefix hits, and with blocks loaded from Redis into a cold engine; corrupt
blocks are recomputed; a dead Redis or a slow link means recompute, never an error.

One warm engine (module scope) computes each test's prompts and writes their blocks to Redis; each
test then starts a cold engine. Prompts are random per test, so no test hits another's blocks.
"""
import random
import threading
import time
import uuid

import pytest
import redis

from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams
from services.prefix_cache.blob import BlockCodec
from services.prefix_cache.hashing import block_hashes
from services.prefix_cache.index import PrefixIndex
from services.prefix_cache.store import MemoryKVStore
from services.prefix_cache.tier import KVTier
from services.prefix_cache.tier_config import KVTierConfig
from services.run import LocalRedis

pytestmark = pytest.mark.integration
ENGINE = dict(num_kv_blocks=96, block_size=16, max_num_batched_tokens=256)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PREFIX_BLOCKS = 6           # a 100-token shared prefix holds 6 full blocks of 16


def run(llm, ps):
    return [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY)]


def tier_llm(model_dir, **cfg):
    tier = KVTier(KVTierConfig(**cfg))
    return LLM(model_dir, kv_tier=tier, **ENGINE), tier


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    llm = LLM(tiny_model_dir, enable_prefix_caching=False, **ENGINE)

    def ref(ps):
        return run(llm, ps)
    ref.llm = llm
    return ref


@pytest.fixture(scope="module")
def warm(tiny_model_dir, redis_url):
    ns = f"t{uuid.uuid4().hex[:8]}"
    llm, tier = tier_llm(tiny_model_dir, redis_url=redis_url, index_namespace=ns, replica_id="warm",
                         write_policy="computed")
    yield llm, tier
    tier.close()


@pytest.fixture(scope="module")
def cold_llm(tiny_model_dir):
    return LLM(tiny_model_dir, **ENGINE)


@pytest.fixture
def cold(cold_llm):
    """A cold replica: cold_llm with its prefix cache emptied and a fresh tier attached (one engine
    build for all the tests; the tier's config varies per test)."""
    tiers = []

    def attach(store=None, **cfg):
        engine = cold_llm.engine
        engine.kv.reset_prefix_cache()
        tier = KVTier(KVTierConfig(**cfg), store=store)
        tier.attach(engine.kv, engine.runner, engine.config)
        engine.kv_tier = tier
        tiers.append(tier)
        return cold_llm, tier

    yield attach
    cold_llm.engine.kv_tier, cold_llm.engine.kv.on_block_full = None, None
    for t in tiers:
        t.close()


@pytest.fixture
def prompts(warm):
    """A 100-token prefix unique to this test, then 3 suffixes of 5, 21 and 40 tokens."""
    rng = random.Random(uuid.uuid4().int)
    vocab = warm[0].engine.vocab_size
    prefix = [rng.randrange(3, vocab) for _ in range(100)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(n)] for n in (5, 21, 40)]


def publish(warm, ps):
    llm, tier = warm
    out = run(llm, ps)
    tier.writer.flush(timeout_s=60)
    return out


def test_outputs_identical_off_local_and_from_redis_into_a_cold_engine(redis_url, warm, cold, reference,
                                                                        prompts):
    want = reference(prompts)
    llm, tier = warm
    hits_before = llm.engine.kv.prefix_hits
    assert publish(warm, prompts[:1]) == want[:1]                # computes, writes to Redis
    assert publish(warm, prompts[1:]) == want[1:]                # local prefix hits
    assert llm.engine.kv.prefix_hits - hits_before >= 2 * PREFIX_BLOCKS * 16
    assert tier.stats.bytes_written > 0

    # A slow replica (prefill prior 100 tokens/s, not yet measured): fetching wins every decision,
    # so the fetch path is what this test checks, whatever the load on the machine.
    llm, cold_tier = cold(redis_url=redis_url, prior_prefill_tokens_per_s=100)
    assert run(llm, prompts) == want                             # blocks from Redis
    # Prompt 1 loads the 6 prefix blocks; prompts 2 and 3 then hit those locally and load only
    # their own suffix blocks (full blocks short of the last token: 1 and 2).
    assert cold_tier.stats.blocks_hit == PREFIX_BLOCKS + 1 + 2
    assert cold_tier.stats.decisions_fetch == 3
    # The three were admitted together: the prefix was fetched once (the later two treat the blocks
    # the first one fetches as local), and nothing was fetched that was not loaded.
    assert cold_tier.stats.bytes_read == (PREFIX_BLOCKS + 1 + 2) * cold_tier.blob_bytes_per_block
    assert llm.engine.kv.prefix_hits >= 3 * PREFIX_BLOCKS * 16


def test_requests_that_share_a_fetched_prefix_wait_for_it(redis_url, warm, cold, reference, prompts):
    """Only the shared prefix is in Redis: the first request fetches it; the other two have nothing of their
    own to fetch but are held until the prefix is imported, and hit it instead of computing it again."""
    want = reference(prompts)
    publish(warm, prompts[:1])
    llm, tier = cold(redis_url=redis_url, prior_prefill_tokens_per_s=100)
    hits_before = llm.engine.kv.prefix_hits
    assert run(llm, prompts) == want
    assert tier.stats.decisions_fetch == 1 and tier.stats.blocks_hit == PREFIX_BLOCKS
    assert tier.stats.bytes_read == PREFIX_BLOCKS * tier.blob_bytes_per_block
    assert llm.engine.kv.prefix_hits - hits_before >= 3 * PREFIX_BLOCKS * 16


def test_fp8_blocks_load_and_decode_close_to_the_original(redis_url, warm, cold, reference, prompts):
    # The warm replica writes fp8 this time; blobs describe their encoding, so any reader decodes them.
    warm[1].codec = BlockCodec(warm[1].codec.layout, warm[1].codec.model_fingerprint, "fp8")
    try:
        publish(warm, prompts[:1])
    finally:
        warm[1].codec = BlockCodec(warm[1].codec.layout, warm[1].codec.model_fingerprint, "raw")
    llm, tier = cold(redis_url=redis_url, prior_prefill_tokens_per_s=100)
    got = run(llm, prompts[:1])[0]
    assert tier.stats.blocks_hit == PREFIX_BLOCKS
    assert tier.stats.bytes_read < 0.3 * PREFIX_BLOCKS * llm.engine.runner.kv_bytes_per_block  # fp32 KV
    # fp8 KV is lossy: greedy tokens may drift, even the first where the tiny model's top logits are
    # close; it must still be one of the exact prefix's three likeliest.
    first = reference.llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=1, logprobs=3))
    assert got[0] in first[0].outputs[0].logprobs[0]


def test_corrupt_block_in_redis_is_detected_and_recomputed(redis_url, warm, cold, reference, prompts):
    publish(warm, prompts[:1])
    r = redis.Redis.from_url(redis_url)
    victim = warm[1].key(block_hashes(prompts[0], 16)[3])        # block 3 of the prefix
    blob = bytearray(r.get(victim))
    blob[-1] ^= 0xFF
    r.set(victim, bytes(blob))
    llm, cold_tier = cold(redis_url=redis_url, prior_prefill_tokens_per_s=100)
    assert run(llm, prompts[:1]) == reference(prompts[:1])
    assert cold_tier.stats.blocks_corrupt == 1 and cold_tier.stats.blocks_hit == 3
    assert r.get(victim) != bytes(blob)                          # deleted (or rewritten since)


def test_dead_redis_means_recompute_without_errors(cold, reference, prompts):
    llm, tier = cold(redis_url="redis://127.0.0.1:9/0", socket_timeout_s=0.05, breaker_failures=2,
                     write_policy="computed")
    assert run(llm, prompts[:2]) == reference(prompts[:2])
    tier.writer.flush(timeout_s=60)
    assert tier.stats.read_bypasses >= 1 and tier.breaker.stats.num_opens >= 1
    assert tier.stats.blocks_hit == 0


def test_slow_link_makes_the_cost_model_choose_recompute(redis_url, warm, cold, reference, prompts):
    publish(warm, prompts[:1])
    llm, cold_tier = cold(redis_url=redis_url, prior_bandwidth_bytes_per_s=1e3,
                          prior_prefill_tokens_per_s=1e6)
    assert run(llm, prompts[:1]) == reference(prompts[:1])
    d = cold_tier.last_decision
    assert d is not None and not d.fetch and d.est_fetch_s > d.est_recompute_s
    # Not even worth asking Redis which blocks it holds: no round trip, no bytes.
    assert cold_tier.stats.decisions_recompute == 1 and cold_tier.stats.blocks_hit == 0
    assert cold_tier.stats.bytes_read == 0


def test_replica_publishes_its_blocks_to_the_prefix_index(redis_url, warm, prompts):
    llm, tier = warm
    publish(warm, prompts[:1])
    index = PrefixIndex(redis_url, tier.config.index_namespace)
    found = index.lookup(block_hashes(prompts[1], 16), ["warm", "other"])
    assert found == {"warm": PREFIX_BLOCKS, "other": 0}
    index.close()


def test_redis_killed_and_restarted_under_requests(cold, reference):
    """Redis dies while requests run and comes back empty: every output is still right, and the
    tier writes again once its breaker has probed the new server."""
    rng = random.Random(uuid.uuid4().int)

    def fresh():
        return [[rng.randrange(3, 2000) for _ in range(40)] for _ in range(2)]

    server = LocalRedis()
    try:
        llm, tier = cold(redis_url=server.url, socket_timeout_s=0.1, breaker_failures=2,
                         breaker_cooldown_s=0.2, write_policy="computed")
        ps = fresh()
        killer = threading.Timer(0.2, server.stop)      # mid-generation
        killer.start()
        assert run(llm, ps) == reference(ps)
        killer.join()
        # Redis gone: bypassed, not failed. Each batch of requests costs one failed lookup (if the
        # cost model asks at all) and each batch of writes one failed write: the breaker opens after
        # `breaker_failures` of them.
        for _ in range(10):
            ps = fresh()
            assert run(llm, ps) == reference(ps)
            tier.writer.flush(timeout_s=60)
            if tier.breaker.stats.num_opens:
                break
        assert tier.breaker.stats.num_opens >= 1
        written = tier.stats.bytes_written
        server.start()
        for _ in range(20):                              # the breaker probes after its cool-down
            ps = fresh()
            assert run(llm, ps) == reference(ps)
            tier.writer.flush(timeout_s=60)
            if tier.stats.bytes_written > written:
                break
            time.sleep(0.2)
        assert tier.stats.bytes_written > written and tier.breaker.state == "closed"
    finally:
        server.stop()


def test_write_on_first_reuse_writes_only_shared_blocks(redis_url, cold, reference, prompts):
    llm, writer = cold(redis_url=redis_url)
    assert writer.config.write_policy == "reused"             # the default
    run(llm, prompts[:1])
    writer.writer.flush(timeout_s=60)
    assert writer.stats.blocks_exported == 0 and writer.stats.bytes_written == 0   # nothing reused yet
    run(llm, prompts[1:2])                        # hits the shared prefix: now it is worth sharing
    writer.writer.flush(timeout_s=60)
    assert writer.stats.blocks_exported == PREFIX_BLOCKS and writer.stats.bytes_written > 0
    llm, reader = cold(redis_url=redis_url, prior_prefill_tokens_per_s=100)
    assert run(llm, prompts[:1]) == reference(prompts[:1])
    assert reader.stats.blocks_hit == PREFIX_BLOCKS


class StalledStore(MemoryKVStore):
    """A backend that answers lookups only when released (a stalled Redis, without the timeouts)."""

    def __init__(self):
        super().__init__(2**30)
        self.release = threading.Event()
        self.num_lookups = 0

    def contains_many(self, keys):
        self.num_lookups += 1
        self.release.wait(10)
        return super().contains_many(keys)


def test_lookups_run_off_the_engine_thread_and_a_stalled_one_times_out(cold, reference, prompts):
    store = StalledStore()
    llm, tier = cold(store=store, load_timeout_s=0.2, prior_prefill_tokens_per_s=100)
    t0 = time.monotonic()
    assert run(llm, prompts) == reference(prompts)     # held, then admitted without their blocks
    assert time.monotonic() - t0 < 5
    assert store.num_lookups >= 1 and tier.loader.num_timeouts == 3
    store.release.set()
    assert run(llm, prompts[:1]) == reference(prompts[:1])   # the late lookup left nothing behind
    assert tier.stats.blocks_hit == 0


def test_a_request_aborted_while_held_is_never_scheduled(cold, prompts):
    store = StalledStore()
    llm, tier = cold(store=store, prior_prefill_tokens_per_s=100)
    engine = llm.engine
    engine.add_request("held", prompts[0], GREEDY)
    assert tier.loader.num_held == 1 and engine.num_waiting == 0
    engine.abort_request("held")
    store.release.set()
    deadline = time.monotonic() + 10
    while tier.loader.num_held and time.monotonic() < deadline:
        assert engine.step() == []
    assert tier.loader.num_held == 0 and engine.num_running == engine.num_waiting == 0
    assert not engine.has_unfinished_requests()
    engine.kv.check_invariants()


class BlockedWrites(MemoryKVStore):
    def __init__(self):
        super().__init__(2**30)
        self.release = threading.Event()

    def put_many(self, items):
        self.release.wait(10)
        return super().put_many(items)


def test_a_backed_up_writer_drops_what_has_no_room_and_counts_it(cold, reference, prompts):
    store = BlockedWrites()
    llm, tier = cold(store=store, max_queue_blocks=8, prior_bandwidth_bytes_per_s=1e3,
                     write_policy="computed")
    assert run(llm, prompts) == reference(prompts)
    assert tier.writer.stats.num_dropped > 0             # beyond the queue's 8 blocks: not even copied
    store.release.set()
    tier.writer.flush(timeout_s=60)
    assert tier.stats.blocks_exported == tier.writer.stats.num_written
    assert len(store) == tier.stats.blocks_exported          # what was not dropped was written


def test_an_fp8_cache_moves_its_blocks_through_redis_bit_for_bit(tiny_model_dir, redis_url, prompts):
    """Engines with kv_cache_dtype="fp8" write and load their float8 blocks as they are (a layout of its own,
    so never mixed up with float32 blocks): the loaded prefix decodes exactly what a recompute decodes."""
    fp8 = dict(ENGINE, kv_cache_dtype="fp8")
    want = run(LLM(tiny_model_dir, enable_prefix_caching=False, **fp8), prompts)
    ns = f"t{uuid.uuid4().hex[:8]}"
    tiers = [KVTier(KVTierConfig(redis_url=redis_url, index_namespace=ns, replica_id="w8", write_policy="computed",
                                 encoding="fp8")),      # stored raw all the same: the cache is float8 already
             KVTier(KVTierConfig(redis_url=redis_url, prior_prefill_tokens_per_s=100))]
    try:
        warm, cold = (LLM(tiny_model_dir, kv_tier=t, **fp8) for t in tiers)
        assert run(warm, prompts[:1]) == want[:1] and run(warm, prompts[1:]) == want[1:]
        tiers[0].writer.flush(timeout_s=60)
        assert tiers[0].codec.layout.dtype == "float8_e4m3fn" and tiers[0].codec.encoding == "raw"
        assert run(cold, prompts) == want
        assert tiers[1].stats.blocks_hit == PREFIX_BLOCKS + 1 + 2
        assert tiers[1].stats.bytes_read == tiers[1].stats.blocks_hit * tiers[1].blob_bytes_per_block
        assert tiers[1].blob_bytes_per_block < 1.1 * cold.engine.runner.kv_bytes_per_block   # one byte a value
    finally:
        for t in tiers:
            t.close()
