"""The prefix index in a real Redis: publish, evict, sync, lookup, TTL."""
import time
import uuid

import pytest

from services.prefix_cache.hashing import block_hashes
from services.prefix_cache.index import PrefixIndex
from services.prefix_cache.store import TierUnavailableError

pytestmark = pytest.mark.integration
TOKENS = list(range(16 * 8))


@pytest.fixture
def index(redis_url):
    idx = PrefixIndex(redis_url, namespace=f"t{uuid.uuid4().hex[:8]}", ttl_s=60)
    yield idx
    idx.close()


def test_lookup_gives_each_replicas_longest_cached_prefix(index):
    hs = block_hashes(TOKENS, 16, salt="a")          # 8 chained blocks
    index.publish("r1", added=hs[:6])
    index.publish("r2", added=hs[:2] + hs[3:8])       # a gap after block 2: prefix stops there
    assert index.lookup(hs, ["r1", "r2", "r3"]) == {"r1": 6, "r2": 2, "r3": 0}
    index.publish("r1", removed=hs[4:6])               # evicted from r1's cache
    index.publish("r2", added=[hs[2]])
    assert index.lookup(hs, ["r1", "r2"]) == {"r1": 4, "r2": 8}


def test_another_tenants_prompt_matches_nothing(index):
    index.publish("r1", added=block_hashes(TOKENS, 16, salt="tenant-a"))
    assert index.lookup(block_hashes(TOKENS, 16, salt="tenant-b"), ["r1"]) == {"r1": 0}


def test_sync_replaces_the_whole_set(index):
    hs = block_hashes(TOKENS, 16, salt="a")
    index.publish("r1", added=hs)
    index.sync("r1", hs[:3])
    assert index.lookup(hs, ["r1"]) == {"r1": 3}
    index.sync("r1", [])
    assert index.lookup(hs, ["r1"]) == {"r1": 0}


async def test_async_lookup_matches_sync_lookup(index):
    hs = block_hashes(TOKENS, 16, salt="a")
    index.publish("r1", added=hs[:5])
    assert await index.alookup(hs, ["r1", "r9"]) == index.lookup(hs, ["r1", "r9"]) == {"r1": 5, "r9": 0}


def test_ttl_drops_a_silent_replica_and_heartbeats_keep_a_live_one(redis_url):
    idx = PrefixIndex(redis_url, namespace=f"t{uuid.uuid4().hex[:8]}", ttl_s=1)
    hs = block_hashes(TOKENS, 16, salt="a")
    idx.publish("dead", added=hs)
    idx.publish("live", added=hs)
    assert 0 < idx.client.pttl(idx.key("live")) <= 1000
    deadline = time.monotonic() + 10
    while idx.lookup(hs, ["dead"])["dead"] and time.monotonic() < deadline:
        idx.heartbeat("live")
        time.sleep(0.1)
    assert idx.lookup(hs, ["dead", "live"]) == {"dead": 0, "live": 8}
    idx.close()


def test_unreachable_index_raises_tier_unavailable():
    idx = PrefixIndex("redis://127.0.0.1:1/0", namespace="x")
    with pytest.raises(TierUnavailableError):
        idx.lookup([b"x" * 16], ["r1"])
    with pytest.raises(ValueError, match="namespace"):
        PrefixIndex("redis://127.0.0.1:1/0", namespace="")
