"""The in-memory store's LRU bound and the breaker-guarded store's bypass."""
import pytest

from services.prefix_cache.breaker import OPEN, CircuitBreaker
from services.prefix_cache.store import (GuardedStore, KVTierStore, MemoryKVStore,
                                         TierUnavailableError, block_key)


def test_memory_store_is_bounded_and_evicts_least_recently_used():
    s = MemoryKVStore(max_bytes=300)
    s.put_many([(b"a", b"x" * 100), (b"b", b"x" * 100), (b"c", b"x" * 100)])
    assert s.get_many([b"a"]) == [b"x" * 100]            # a is now the most recent
    s.put_many([(b"d", b"y" * 100)])
    assert s.contains_many([b"a", b"b", b"c", b"d"]) == [True, False, True, True]
    assert s.num_bytes == 300 and s.num_evictions() == 1 and len(s) == 3
    s.put_many([(b"huge", b"z" * 301)])                   # never fits: not stored, nothing evicted
    assert s.contains_many([b"huge"]) == [False] and s.num_evictions() == 1


def test_memory_store_overwrite_keeps_byte_count():
    s = MemoryKVStore(max_bytes=1000)
    s.put_many([(b"a", b"1" * 10)])
    s.put_many([(b"a", b"2" * 20)])
    assert s.num_bytes == 20 and s.get_many([b"a", b"zz"]) == [b"2" * 20, None]
    s.delete_many([b"a", b"zz"])
    assert s.num_bytes == 0 and len(s) == 0


def test_block_key_separates_model_layout_and_hash():
    h = bytes(range(16))
    keys = {block_key("m1", "l1", h), block_key("m2", "l1", h), block_key("m1", "l2", h),
            block_key("m1", "l1", bytes(16))}
    assert len(keys) == 4


class FlakyStore(KVTierStore):
    def __init__(self):
        self.up = True
        self.data = {}
        self.calls = 0

    def _check(self):
        self.calls += 1
        if not self.up:
            raise TierUnavailableError("down")

    def get_many(self, keys):
        self._check()
        return [self.data.get(k) for k in keys]

    def contains_many(self, keys):
        self._check()
        return [k in self.data for k in keys]

    def put_many(self, items):
        self._check()
        self.data.update(items)
        return sum(len(v) for _, v in items)

    def delete_many(self, keys):
        self._check()
        for k in keys:
            self.data.pop(k, None)


def test_guarded_store_turns_failures_into_misses_and_stops_calling_when_open():
    inner, clock = FlakyStore(), [0.0]
    g = GuardedStore(inner, CircuitBreaker(failure_threshold=2, cooldown_s=1, clock=lambda: clock[0]))
    assert g.put_many([(b"k", b"v")]) == 1
    inner.up = False
    assert g.get_many([b"k"]) == [None]
    assert g.try_get_many([b"k"]) is None
    assert g.breaker.state == OPEN and inner.calls == 3
    assert g.contains_many([b"k"]) == [False] and g.put_many([(b"j", b"v")]) == 0
    assert inner.calls == 3                                  # open: no backend calls at all
    inner.up = True
    clock[0] += 1
    assert g.get_many([b"k"]) == [b"v"]                      # the probe closes it
    assert g.breaker.state == "closed" and g.num_errors == 2


def test_guarded_store_does_not_hide_bugs():
    class Buggy(FlakyStore):
        def get_many(self, keys):
            raise KeyError("a bug, not an outage")

    with pytest.raises(KeyError):
        GuardedStore(Buggy(), CircuitBreaker()).get_many([b"k"])
