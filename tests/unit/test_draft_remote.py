"""RemoteDraftProposer without Ray: fake handles shaped like Serve's in its two modes.

A handle that routes on the caller's event loop (Serve with RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0,
as services/run.py runs it) cannot be called from the engine thread, which has no loop: a proposer
built on a loop sends every call there. One built without a loop blocks on `.result()`, which
needs Serve's default router thread. Either way a slow or failed call means no guesses, never an
error that reaches a request.
"""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from services.draft.protocol import DraftBatch, DraftReply
from services.draft.remote import RemoteDraftProposer
from services.engine.spec_decode import ProposalInput, ProposerUnavailable

INPUTS = [ProposalInput(f"r{i}", [1, 2, 3, i], 2, 0.0) for i in range(3)]


def _replies(batch: DraftBatch) -> list[DraftReply]:
    return [DraftReply(c.seq_id, token_ids=[7, 8]) for c in batch.calls]


class LoopHandle:
    """`propose.remote()` needs a running loop and gives an awaitable, like a handle whose router
    runs on the current loop; `delay_s` None = the reply never comes."""

    def __init__(self, delay_s: float | None = 0.0) -> None:
        self.delay_s = delay_s
        self.propose = self
        self.num_cancelled = 0

    def remote(self, batch: DraftBatch, shard_key: int | None = None) -> LoopResponse:
        asyncio.get_running_loop()   # RuntimeError off the loop, as Serve's "No event loop running"
        return LoopResponse(self, batch)


class LoopResponse:
    def __init__(self, handle: LoopHandle, batch: DraftBatch) -> None:
        self.handle, self.batch = handle, batch

    def __await__(self):
        return self._get().__await__()

    async def _get(self) -> list[DraftReply]:
        if self.handle.delay_s is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.handle.delay_s)
        return _replies(self.batch)

    def cancel(self) -> None:
        self.handle.num_cancelled += 1


class ThreadHandle:
    """Serve's default: `.remote()` from any thread, `.result(timeout_s=)` blocks."""

    def __init__(self) -> None:
        self.propose = self

    def remote(self, batch: DraftBatch, shard_key: int | None = None) -> ThreadResponse:
        return ThreadResponse(batch)


class ThreadResponse:
    def __init__(self, batch: DraftBatch) -> None:
        self.batch = batch

    def result(self, timeout_s: float | None = None) -> list[DraftReply]:
        return _replies(self.batch)

    def cancel(self) -> None:
        pass


@pytest.fixture
def loop_thread():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()


def _build_on(loop: asyncio.AbstractEventLoop, handle, **kwargs) -> RemoteDraftProposer:
    async def build():
        return RemoteDraftProposer(handle, **kwargs)   # the loop is captured, as in LLMServer.__init__
    return asyncio.run_coroutine_threadsafe(build(), loop).result(timeout=5)


def test_built_on_a_loop_it_calls_from_a_thread_without_one(loop_thread):
    proposer = _build_on(loop_thread, LoopHandle(), num_shards=2)
    assert proposer.loop is loop_thread
    out = proposer.propose(INPUTS)     # this (test) thread has no event loop, like the engine's
    assert [p.token_ids for p in out] == [[7, 8]] * len(INPUTS)


def test_a_slow_draft_means_no_guesses_within_the_deadline(loop_thread):
    handle = LoopHandle(delay_s=None)
    proposer = _build_on(loop_thread, handle, timeout_s=0.1, num_shards=2, cooldown_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(ProposerUnavailable, match="TimeoutError"):
        proposer.propose(INPUTS)
    assert time.monotonic() - t0 < 1.0
    assert proposer.num_failed_calls >= 1
    time.sleep(0.05)
    assert handle.num_cancelled == proposer.num_failed_calls   # late calls are cancelled
    with pytest.raises(ProposerUnavailable, match="failed recently"):
        proposer.propose(INPUTS)       # cooldown: no call at all


def test_a_closed_loop_means_no_guesses():
    loop = asyncio.new_event_loop()
    proposer = RemoteDraftProposer(LoopHandle(), loop=loop)
    loop.close()
    with pytest.raises(ProposerUnavailable, match="closed"):
        proposer.propose(INPUTS)


def test_built_without_a_loop_it_blocks_on_result():
    proposer = RemoteDraftProposer(ThreadHandle(), num_shards=2)
    assert proposer.loop is None
    assert [p.token_ids for p in proposer.propose(INPUTS)] == [[7, 8]] * len(INPUTS)


def test_a_loop_only_handle_without_a_loop_means_no_guesses():
    proposer = RemoteDraftProposer(LoopHandle())
    with pytest.raises(ProposerUnavailable, match="RuntimeError"):
        proposer.propose(INPUTS)
