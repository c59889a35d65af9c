"""Circuit breaker states, stepped with a fake clock (no sleeps)."""
import threading

import pytest

from services.prefix_cache.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_opens_after_consecutive_failures_only():
    b = CircuitBreaker(failure_threshold=3, cooldown_s=5, clock=Clock())
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert b.allow()
    b.record_success()                    # a success resets the run of failures
    for _ in range(2):
        b.record_failure()
    assert b.state == CLOSED
    b.record_failure()
    assert b.state == OPEN and b.stats.num_opens == 1
    assert not b.allow() and not b.allow()
    assert b.stats.num_bypassed == 2


def test_half_open_lets_one_probe_through_and_closes_on_success():
    clock = Clock()
    changes = []
    b = CircuitBreaker(failure_threshold=1, cooldown_s=5, clock=clock, on_state_change=changes.append)
    b.record_failure()
    clock.t += 4.9
    assert not b.allow()
    clock.t += 0.2
    assert b.allow()                      # the probe
    assert b.state == HALF_OPEN
    assert not b.allow()                  # everyone else waits for the probe
    b.record_success()
    assert b.state == CLOSED and b.allow()
    assert changes == [OPEN, HALF_OPEN, CLOSED]


def test_failed_probe_reopens_for_a_new_cooldown():
    clock = Clock()
    b = CircuitBreaker(failure_threshold=2, cooldown_s=5, clock=clock)
    b.record_failure(); b.record_failure()
    clock.t += 5
    assert b.allow()
    b.record_failure()
    assert b.state == OPEN and b.stats.num_opens == 2
    clock.t += 4
    assert not b.allow()
    clock.t += 1
    assert b.allow() and b.stats.num_probes == 2


def test_only_one_probe_among_concurrent_callers():
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, cooldown_s=1, clock=clock)
    b.record_failure()
    clock.t += 2
    results = []
    threads = [threading.Thread(target=lambda: results.append(b.allow())) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1


def test_bad_settings_name_the_parameter():
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError, match="cooldown_s"):
        CircuitBreaker(cooldown_s=0)


def test_bypassing_tells_without_taking_the_probe():
    now = [0.0]
    b = CircuitBreaker(failure_threshold=1, cooldown_s=1.0, clock=lambda: now[0])
    assert not b.bypassing()
    b.record_failure()
    assert b.bypassing() and b.state == "open"
    now[0] = 1.5
    assert not b.bypassing() and b.state == "open"     # a caller may probe now; nothing changed
    assert b.allow() and b.bypassing()                  # the probe is out: everyone else bypasses
    b.record_success()
    assert not b.bypassing()
