"""RedisKVStore against a real redis-server: round trips, TTLs, corruption, memory bound."""
import uuid

import pytest
import redis
import torch

from services.prefix_cache.blob import BlobError, BlockCodec, KVLayout
from services.prefix_cache.hashing import block_hashes
from services.prefix_cache.store import RedisKVStore, block_key
from services.run import LocalRedis

pytestmark = pytest.mark.integration
LAYOUT = KVLayout("LKBHD", (2, 2, 16, 2, 16), "bfloat16")


def blocks(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(LAYOUT.shape, generator=g).to(torch.bfloat16) for _ in range(n)]


@pytest.fixture
def model():
    return f"m{uuid.uuid4().hex[:8]}"          # one key space per test on the shared server


def test_round_trip_of_encoded_blocks_with_ttl(redis_url, model):
    store = RedisKVStore(redis_url, ttl_s=600)
    codec = BlockCodec(LAYOUT, model, encoding="raw")
    hashes = block_hashes(list(range(64)), 16, salt="t1")
    xs = blocks(4)
    keys = [block_key(model, LAYOUT.fingerprint, h) for h in hashes]
    written = store.put_many([(k, codec.encode(h, x)) for k, h, x in zip(keys, hashes, xs)])
    assert written > 4 * LAYOUT.num_bytes
    assert store.contains_many(keys + [b"kv:absent"]) == [True] * 4 + [False]
    got = store.get_many([keys[0], b"kv:absent", keys[3]])
    assert got[1] is None
    assert torch.equal(codec.decode(hashes[0], got[0]), xs[0])
    assert torch.equal(codec.decode(hashes[3], got[2]), xs[3])
    ttl = store.client.ttl(keys[0])
    assert 0 < ttl <= 600
    store.client.expire(keys[0], 5)
    store.get_many([keys[0]])                  # a read refreshes the TTL (GETEX)
    assert store.client.ttl(keys[0]) > 5
    # Content-addressed: a second writer of the same blocks ships nothing.
    assert store.put_many([(k, codec.encode(h, x)) for k, h, x in zip(keys, hashes, xs)]) == 0
    store.close()


def test_corrupted_or_foreign_value_is_detected(redis_url, model):
    store = RedisKVStore(redis_url)
    codec = BlockCodec(LAYOUT, model)
    h = block_hashes(list(range(16)), 16, salt="t1")[0]
    key = block_key(model, LAYOUT.fingerprint, h)
    blob = bytearray(codec.encode(h, blocks(1)[0]))
    blob[len(blob) // 2] ^= 0xFF
    store.client.set(key, bytes(blob))
    with pytest.raises(BlobError, match="checksum"):
        codec.decode(h, store.get_many([key])[0])
    other = BlockCodec(LAYOUT, model + "-other")
    store.client.set(key, other.encode(h, blocks(1)[0]))
    with pytest.raises(BlobError, match="model"):
        codec.decode(h, store.get_many([key])[0])


def test_tenants_never_share_keys(redis_url, model):
    store = RedisKVStore(redis_url)
    codec = BlockCodec(LAYOUT, model)
    tokens = list(range(32))
    ha, hb = block_hashes(tokens, 16, salt="tenant-a"), block_hashes(tokens, 16, salt="tenant-b")
    store.put_many([(block_key(model, LAYOUT.fingerprint, h), codec.encode(h, x))
                    for h, x in zip(ha, blocks(2))])
    assert store.contains_many([block_key(model, LAYOUT.fingerprint, h) for h in hb]) == [False] * 2


def test_maxmemory_allkeys_lru_evicts_instead_of_failing():
    server = LocalRedis(("--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"))
    try:
        store = RedisKVStore(server.url)
        codec = BlockCodec(LAYOUT, "m")
        x = blocks(1)[0]                                        # 4 KiB per block
        hashes = block_hashes(list(range(16 * 1024)), 16, salt="t")    # 4 MiB in all, 2x the bound
        for i in range(0, len(hashes), 64):
            store.put_many([(block_key("m", LAYOUT.fingerprint, h), codec.encode(h, x))
                            for h in hashes[i:i + 64]])
        assert store.num_evictions() > 0
        assert redis.Redis.from_url(server.url).dbsize() < len(hashes)
        store.close()
    finally:
        server.stop()
