"""The KV tier's asynchronous writer: the request path only enqueues; a background thread batches.

`submit` never blocks and never raises on a full queue: the item is dropped and counted (a block
not written to the tier is only a future miss). The thread takes up to `max_batch` items at a time
and hands them to `sink` as one call (one pipelined round trip to Redis). A sink that raises is a
bug, not a backend failure (GuardedStore already turns those into no-ops): it is logged, counted,
and the thread goes on.
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
    num_submitted: int = 0
    num_dropped: int = 0
    num_written: int = 0          # items handed to the sink
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
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> bool:
        """Enqueue without blocking; False (and counted) if the queue is full or closed."""
        if self._closed:
            self.stats.num_dropped += 1
            return False
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.stats.num_dropped += 1
            return False
        self.stats.num_submitted += 1
        return True

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

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
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            while len(batch) < self._max_batch and first is not _STOP:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(x is _STOP for x in batch)
            items = [x for x in batch if x is not _STOP]
            if items:
                try:
                    self._sink(items)
                    self.stats.num_written += len(items)
                    self.stats.num_batches += 1
                except Exception:  # noqa: BLE001 - keep the writer alive; the error is logged
                    self.stats.num_sink_errors += 1
                    log.exception("KV tier writer sink failed on a batch of %d items", len(items))
            for _ in batch:
                self._queue.task_done()
            if stop:
                return
