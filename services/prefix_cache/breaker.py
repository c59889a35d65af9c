"""A circuit breaker for the KV tier's backend (Redis).

closed   -> every call goes through; `failure_threshold` consecutive failures open it.
open     -> every call is bypassed (no network) until `cooldown_s` has passed since it opened.
half-open-> exactly one caller gets through as a probe; its success closes the breaker, its failure
            opens it again for another cool-down. Everyone else is bypassed meanwhile.
Thread-safe: the engine thread (reads) and the writer thread (writes) share one breaker.
The clock is injectable so tests step time instead of sleeping.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(slots=True)
class BreakerStats:
    num_opens: int = 0
    num_bypassed: int = 0
    num_failures: int = 0
    num_probes: int = 0


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 3, cooldown_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_state_change: Callable[[str], None] | None = None) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if cooldown_s <= 0:
            raise ValueError(f"cooldown_s must be > 0, got {cooldown_s}")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.stats = BreakerStats()
        self._clock = clock
        self._on_state_change = on_state_change
        self._lock = threading.Lock()
        self._state = CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    def allow(self) -> bool:
        """Whether the caller may use the backend now. A True in half-open makes the caller the probe,
        and it must then report record_success() or record_failure()."""
        with self._lock:
            if self._state == CLOSED:
                return True
            if self._state == OPEN and self._clock() - self._opened_at >= self.cooldown_s:
                self._set(HALF_OPEN)
            if self._state == HALF_OPEN and not self._probe_in_flight:
                self._probe_in_flight = True
                self.stats.num_probes += 1
                return True
            self.stats.num_bypassed += 1
            return False

    def bypassing(self) -> bool:
        """Whether a call now would surely be bypassed (open, cool-down not over; or a probe out).
        Changes nothing: a caller that skips work on True never takes the probe's turn."""
        with self._lock:
            if self._state == OPEN:
                return self._clock() - self._opened_at < self.cooldown_s
            return self._state == HALF_OPEN and self._probe_in_flight

    def record_success(self) -> None:
        with self._lock:
            self._consecutive_failures = 0
            self._probe_in_flight = False
            if self._state != CLOSED:
                self._set(CLOSED)

    def record_failure(self) -> None:
        with self._lock:
            self.stats.num_failures += 1
            self._consecutive_failures += 1
            was_probe, self._probe_in_flight = self._probe_in_flight, False
            if was_probe or (self._state == CLOSED
                             and self._consecutive_failures >= self.failure_threshold):
                self._opened_at = self._clock()
                self.stats.num_opens += 1
                self._set(OPEN)

    def _set(self, state: str) -> None:
        self._state = state
        if self._on_state_change is not None:
            self._on_state_change(state)
