"""Redis killed, restarted, slowed and filled under load: the tier bypasses, nothing fails.

Each test starts its own redis-server (services/run.py LocalRedis) so it can kill it.
"""
import signal
import threading
import time

import pytest
import torch

from services.prefix_cache.blob import BlockCodec, KVLayout
from services.prefix_cache.breaker import CLOSED, CircuitBreaker
from services.prefix_cache.hashing import block_hashes
from services.prefix_cache.store import GuardedStore, RedisKVStore, block_key
from services.prefix_cache.writer import AsyncWriter
from services.run import LocalRedis

pytestmark = pytest.mark.integration
LAYOUT = KVLayout("LKBHD", (2, 2, 16, 2, 16), "bfloat16")
CODEC = BlockCodec(LAYOUT, "m")
BLOCK = torch.ones(LAYOUT.shape, dtype=torch.bfloat16)


def key(h):
    return block_key("m", LAYOUT.fingerprint, h)


class Load:
    """A reader and a writer thread hammering the guarded store; every exception is recorded."""

    def __init__(self, store: GuardedStore):
        self.store, self.errors, self.ops, self.hits = store, [], 0, 0
        self.writer = AsyncWriter(lambda items: store.put_many(
            [(key(h), CODEC.encode(h, BLOCK)) for h in items]), max_queue=64, max_batch=16)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._read), threading.Thread(target=self._write)]

    def _read(self):
        i = 0
        while not self.stop.is_set():
            try:
                hs = block_hashes(list(range(i % 50, i % 50 + 64)), 16, salt="s")
                got = self.store.get_many([key(h) for h in hs])
                self.hits += sum(v is not None for v in got)
                self.ops += 1
            except Exception as e:                 # noqa: BLE001 - the test counts them
                self.errors.append(e)
            i += 1
            time.sleep(0.002)

    def _write(self):
        i = 0
        while not self.stop.is_set():
            try:
                for h in block_hashes(list(range(i % 50, i % 50 + 64)), 16, salt="s"):
                    self.writer.submit(h)
            except Exception as e:                 # noqa: BLE001
                self.errors.append(e)
            i += 1
            time.sleep(0.005)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()
        self.writer.close()


def wait_for(cond, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_kill_and_restart_redis_under_load():
    server = LocalRedis()
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=0.2)
    store = GuardedStore(RedisKVStore(server.url, socket_timeout_s=0.1, connect_timeout_s=0.1),
                         breaker)
    try:
        with Load(store) as load:
            assert wait_for(lambda: load.hits > 0)             # the tier works
            server.stop()                                       # Redis dies mid-load
            assert wait_for(lambda: breaker.stats.num_opens >= 1)
            ops_while_down = load.ops
            assert wait_for(lambda: load.ops > ops_while_down + 20)   # requests go on, bypassed
            server.start()                                      # same port, empty
            hits_before = load.hits
            assert wait_for(lambda: breaker.state == CLOSED and load.hits > hits_before)
        assert load.errors == []
        assert breaker.stats.num_bypassed > 0 and store.num_errors >= 3
    finally:
        store.close()
        server.stop()


def test_slow_redis_times_out_into_bypass():
    server = LocalRedis()
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=0.3)
    store = GuardedStore(RedisKVStore(server.url, socket_timeout_s=0.05), breaker)
    try:
        with Load(store) as load:
            assert wait_for(lambda: load.hits > 0)
            server.proc.send_signal(signal.SIGSTOP)            # a stalled Redis: accepts, never answers
            try:
                assert wait_for(lambda: breaker.stats.num_opens >= 1)
                ops_while_stalled = load.ops
                assert wait_for(lambda: load.ops > ops_while_stalled + 20)
            finally:
                server.proc.send_signal(signal.SIGCONT)
            hits_before = load.hits
            assert wait_for(lambda: breaker.state == CLOSED and load.hits > hits_before)
        assert load.errors == [] and "Timeout" in (store.last_error or "")
    finally:
        store.close()
        server.stop()


def test_out_of_memory_redis_is_bypassed_without_failures():
    server = LocalRedis(("--maxmemory", "1mb", "--maxmemory-policy", "noeviction"))
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=0.2)
    store = GuardedStore(RedisKVStore(server.url), breaker)
    try:
        with Load(store) as load:
            # SETs answered with OOM; whether the breaker also opens depends on how writes and
            # (succeeding) reads interleave, so the test waits for the error itself.
            assert wait_for(lambda: "OutOfMemory" in (store.last_error or ""))
            ops_at_oom = load.ops
            assert wait_for(lambda: load.ops > ops_at_oom + 50)
        assert load.errors == [] and store.num_errors >= 1
        assert load.writer.stats.num_sink_errors == 0
    finally:
        store.close()
        server.stop()
