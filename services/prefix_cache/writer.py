"""The KV tier's asynchronous writer: the request path only enqueues; a background thread batches.

Each item has a weight (the KV tier submits one item per engine step, weighing its number of
blocks); `max_queue` and `max_batch` count weight. `submit` never blocks and never raises on a
full queue: the item is dropped and counted (a block not written to the tier is only a future
miss); `room` lets a caller skip building what would be dropped. The
thread takes items while their weight is under `max_batch` (so at least one; the last may cross
it) and hands them to `sink` as one call (one pipelined round trip to Redis). A sink that raises is a bug, not a backend failure
(GuardedStore already turns those into no-ops): it is logged, counted, and the thread goes on.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)
_STOP = object()


@dataclass(slots=True)
class WriterStats:
    num_submitted: int = 0        # weight accepted
    num_dropped: int = 0          # weight dropped (queue full or writer closed)
    num_written: int = 0          # weight handed to the sink
    num_batches: int = 0
    num_sink_errors: int = 0


class AsyncWriter(Generic[T]):
    def __init__(self, sink: Callable[[list[T]], None], max_queue: int = 256, max_batch: int = 32,
                 name: str = "kv-tier-writer") -> None:
        if max_queue < 1 or max_batch < 1:
            raise ValueError(f"max_queue and max_batch must be >= 1, got {max_queue}, {max_batch}")
        self.stats = WriterStats()
        self._sink = sink
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._queue: queue.Queue = queue.Queue()     # (item, weight); bounded by weight below
        self._queued = 0                             # weight in the queue, not yet taken
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T, weight: int = 1) -> bool:
        """Enqueue without blocking; False (and counted) if the queue is full or closed."""
        with self._lock:
            if self._closed or self._queued + weight > self._max_queue:
                self.stats.num_dropped += weight
                return False
            self._queued += weight
            self.stats.num_submitted += weight
        self._queue.put_nowait((item, weight))
        return True

    @property
    def room(self) -> int:
        """Weight that `submit` would accept now."""
        return 0 if self._closed else max(self._max_queue - self._queued, 0)

    def count_dropped(self, weight: int) -> None:
        """Count work the caller dropped itself because `room` was short."""
        with self._lock:
            self.stats.num_dropped += weight

    @property
    def queue_depth(self) -> int:
        """Weight queued and not yet taken by the thread."""
        return self._queued

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything submitted so far has been handed to the sink (tests, shutdown)."""
        done = threading.Event()

        def waiter() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        return done.wait(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, then stop the thread."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
        self._queue.put((_STOP, 0))
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            weight = batch[0][1]
            while weight < self._max_batch and batch[-1][0] is not _STOP:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
                weight += batch[-1][1]
            with self._lock:
                self._queued -= weight
            stop = any(x is _STOP for x, _ in batch)
            items = [x for x, _ in batch if x is not _STOP]
            if items:
                try:
                    self._sink(items)
                    self.stats.num_written += weight
                    self.stats.num_batches += 1
                except Exception:  # noqa: BLE001 - keep the writer alive; the error is logged
                    self.stats.num_sink_errors += 1
                    log.exception("KV tier writer sink failed on a batch of %d items", len(items))
            for _ in batch:
                self._queue.task_done()
            if stop:
                return
