"""The `remote` proposer: a client of the DraftServer deployment, called from the engine's loop thread.

Sequences are grouped into shards (services/draft/router.py), one call per shard per step, all
sent at once and awaited against one per-step deadline (`timeout_s`). A call that times out or
fails (replica dead, application deleted) gives no guesses; when every call of a step fails the
proposer raises ProposerUnavailable, the engine decodes without speculation, and the proposer
stays away from the service for a cooldown (doubling up to `max_cooldown_s`) before trying again,
so a dead service costs one timeout per cooldown rather than one per step. Nothing is retried:
a step without guesses is still a correct step.

Where the calls run: when the proposer is built on a running event loop (inside a Serve replica:
LLMServer's constructor runs on the replica's loop) it sends and awaits every call on that loop,
handing the step over with `run_coroutine_threadsafe`. That is what a handle needs when Serve
routes on the replica's own loop (RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0, services/run.py): such
a handle cannot be used from a thread without a loop. Built without a loop (a plain script), it
blocks on `response.result()`, which needs Serve's default router thread.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from services.draft.protocol import DraftBatch, DraftReply
from services.draft.router import shard_of
from services.draft.tracker import SequenceTracker
from services.engine.spec_decode import Proposal, ProposalInput, Proposer, ProposerUnavailable

log = logging.getLogger(__name__)
# How long past the step's deadline the engine thread waits for the loop to hand the replies back.
LOOP_MARGIN_S = 0.05


class RemoteDraftProposer(Proposer):
    name = "remote"

    def __init__(self, handle: Any, timeout_s: float = 0.25, num_shards: int = 8, cooldown_s: float = 0.5,
                 max_cooldown_s: float = 8.0, loop: asyncio.AbstractEventLoop | None = None):
        if timeout_s <= 0 or num_shards < 1 or cooldown_s < 0:
            raise ValueError(f"need timeout_s > 0, num_shards >= 1, cooldown_s >= 0; got {timeout_s}, "
                             f"{num_shards}, {cooldown_s}")
        self.handle = handle
        self.timeout_s = timeout_s
        self.num_shards = num_shards
        self.base_cooldown_s = self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.loop = loop or _running_loop()
        self.tracker = SequenceTracker(namespace=uuid.uuid4().hex[:12])   # one namespace per engine
        self._release: dict[int, list[str]] = {}
        self._down_until = 0.0
        self.num_failed_calls = 0

    def propose(self, inputs: list[ProposalInput]) -> list[Proposal | None]:
        now = time.monotonic()
        if now < self._down_until:
            raise ProposerUnavailable(f"draft service failed recently; next try in {self._down_until - now:.2f}s")
        shards: dict[int, list[int]] = {}
        for i, inp in enumerate(inputs):
            shards.setdefault(shard_of(inp.request_id, self.num_shards), []).append(i)
        calls = [self.tracker.call(inp) for inp in inputs]
        batches = {shard: DraftBatch([calls[i] for i in idx], self._release.pop(shard, []))
                   for shard, idx in shards.items()}
        deadline = now + self.timeout_s
        results = self._on_loop(batches, deadline) if self.loop is not None else self._blocking(batches, deadline)
        out: list[Proposal | None] = [None] * len(inputs)
        errors = []
        for shard, replies in results.items():
            if isinstance(replies, BaseException):   # timeout, dead replica, deleted app: all mean "no guesses"
                errors.append(f"{type(replies).__name__}: {replies}"[:200])
                continue
            for i, reply in zip(shards[shard], replies):
                out[i] = self.tracker.on_reply(inputs[i].request_id, calls[i], reply)
        if errors:
            self.num_failed_calls += len(errors)
            self._down_until = time.monotonic() + self.cooldown_s
            self.cooldown_s = min(max(self.cooldown_s * 2, 0.05), self.max_cooldown_s)
            if len(errors) == len(results):
                raise ProposerUnavailable(f"{len(errors)} draft call(s) failed: {errors[0]}")
            log.info("%d of %d draft calls failed: %s", len(errors), len(results), errors[0])
        else:
            self.cooldown_s = self.base_cooldown_s
        return out

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            for sid in self.tracker.release([rid]):
                self._release.setdefault(shard_of(rid, self.num_shards), []).append(sid)

    # ---- sending: shard -> replies, or the exception that stands for "no guesses" -------------
    def _blocking(self, batches: dict[int, DraftBatch], deadline: float) -> dict[int, Any]:
        results: dict[int, Any] = {}
        responses = {}
        for shard, batch in batches.items():
            try:
                responses[shard] = self.handle.propose.remote(batch, shard_key=shard)
            except Exception as e:  # noqa: BLE001 - e.g. a handle that needs an event loop
                results[shard] = e
        for shard, response in responses.items():
            try:
                results[shard] = response.result(timeout_s=max(deadline - time.monotonic(), 1e-3))
            except Exception as e:  # noqa: BLE001
                results[shard] = e
                _cancel(response)
        return results

    def _on_loop(self, batches: dict[int, DraftBatch], deadline: float) -> dict[int, Any]:
        coro = self._send_and_await(batches, deadline)
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError as e:   # the loop is closed
            coro.close()
            return dict.fromkeys(batches, e)
        try:
            return future.result(timeout=max(deadline - time.monotonic(), 0.0) + LOOP_MARGIN_S)
        except TimeoutError:
            future.cancel()   # cancels the calls too (the coroutine's finally)
            return dict.fromkeys(batches, TimeoutError("the event loop was too busy to run the draft calls in time"))
        except Exception as e:  # noqa: BLE001 - a call could not even be sent
            return dict.fromkeys(batches, e)

    async def _send_and_await(self, batches: dict[int, DraftBatch], deadline: float) -> dict[int, Any]:
        responses = {shard: self.handle.propose.remote(batch, shard_key=shard) for shard, batch in batches.items()}
        tasks = {shard: asyncio.ensure_future(_awaited(r)) for shard, r in responses.items()}
        late = set()
        try:
            await asyncio.wait(tasks.values(), timeout=max(deadline - time.monotonic(), 1e-3))
        finally:
            for shard, task in tasks.items():
                if not task.done():   # a late reply is useless
                    late.add(shard)
                    task.cancel()
                    _cancel(responses[shard])
        return {shard: TimeoutError(f"no draft reply within {self.timeout_s}s") if shard in late or task.cancelled()
                else task.exception() or task.result() for shard, task in tasks.items()}


async def _awaited(response: Any) -> list[DraftReply]:
    return await response


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _cancel(response: Any) -> None:
    """Best effort: a late reply is useless. cancel() re-raises the call's own failure (already
    counted above) when the call had failed rather than timed out."""
    try:
        response.cancel()
    except Exception:  # noqa: BLE001, S110
        pass
