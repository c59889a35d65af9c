"""The async writer: batches, never blocks the caller, drops and counts when full."""
import threading

import pytest

from services.prefix_cache.writer import AsyncWriter


def test_everything_submitted_reaches_the_sink_in_batches():
    got = []
    w = AsyncWriter(lambda items: got.append(list(items)), max_queue=1000, max_batch=8)
    for i in range(100):
        assert w.submit(i)
    assert w.flush(timeout_s=10)
    w.close()
    assert sorted(x for b in got for x in b) == list(range(100))
    assert all(len(b) <= 8 for b in got)
    assert w.stats.num_written == 100 and w.stats.num_dropped == 0


def test_full_queue_drops_and_counts_without_blocking():
    release, entered = threading.Event(), threading.Event()
    got = []

    def slow_sink(items):
        entered.set()
        release.wait(10)
        got.extend(items)

    w = AsyncWriter(slow_sink, max_queue=4, max_batch=1)
    w.submit("first")
    assert entered.wait(10)               # the thread holds "first"; the queue is empty again
    accepted = [w.submit(i) for i in range(10)]
    assert accepted == [True] * 4 + [False] * 6
    assert w.stats.num_dropped == 6 and w.queue_depth == 4
    release.set()
    w.close()
    assert got == ["first", 0, 1, 2, 3]


def test_a_failing_sink_is_counted_and_the_writer_goes_on():
    got = []

    def sink(items):
        if "bad" in items:
            raise RuntimeError("boom")
        got.extend(items)

    w = AsyncWriter(sink, max_batch=1)
    w.submit("bad")
    w.submit("good")
    w.close()
    assert got == ["good"] and w.stats.num_sink_errors == 1


def test_submit_after_close_is_a_counted_drop():
    w = AsyncWriter(lambda items: None)
    w.close()
    assert not w.submit(1) and w.stats.num_dropped == 1


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="max_queue"):
        AsyncWriter(lambda items: None, max_queue=0)


def test_weights_bound_the_queue_and_the_batches():
    release, entered = threading.Event(), threading.Event()
    got = []

    def sink(items):
        entered.set()
        release.wait(10)
        got.append(list(items))

    w = AsyncWriter(sink, max_queue=10, max_batch=6)
    assert w.submit("first", weight=3)
    assert entered.wait(10)
    assert w.room == 10
    assert w.submit("a", weight=4) and w.submit("b", weight=4) and not w.submit("c", weight=4)
    assert w.room == 2 and w.queue_depth == 8 and w.stats.num_dropped == 4
    w.count_dropped(5)
    assert w.stats.num_dropped == 9
    release.set()
    w.close()
    assert got == [["first"], ["a", "b"]]     # a batch takes items while under max_batch weight
    assert w.stats.num_written == 11 and w.room == 0
