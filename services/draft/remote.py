"""The `remote` proposer: a client of the DraftServer deployment, called from the engine's loop thread.

Sequences are grouped into shards (services/draft/router.py), one call per shard per step, all
sent at once and awaited against one per-step deadline (`timeout_s`). A call that times out or
fails (replica dead, application deleted) gives no guesses; when every call of a step fails the
proposer raises ProposerUnavailable, the engine decodes without speculation, and the proposer
stays away from the service for a cooldown (doubling up to `max_cooldown_s`) before trying again,
so a dead service costs one timeout per cooldown rather than one per step. Nothing is retried:
a step without guesses is still a correct step.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from services.draft.protocol import DraftBatch
from services.draft.router import shard_of
from services.draft.tracker import SequenceTracker
from services.engine.spec_decode import Proposal, ProposalInput, Proposer, ProposerUnavailable

log = logging.getLogger(__name__)


class RemoteDraftProposer(Proposer):
    name = "remote"

    def __init__(self, handle: Any, timeout_s: float = 0.25, num_shards: int = 8, cooldown_s: float = 0.5,
                 max_cooldown_s: float = 8.0):
        if timeout_s <= 0 or num_shards < 1 or cooldown_s < 0:
            raise ValueError(f"need timeout_s > 0, num_shards >= 1, cooldown_s >= 0; got {timeout_s}, "
                             f"{num_shards}, {cooldown_s}")
        self.handle = handle
        self.timeout_s = timeout_s
        self.num_shards = num_shards
        self.base_cooldown_s = self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
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
        pending = {}
        for shard, idx in shards.items():
            batch = DraftBatch([calls[i] for i in idx], self._release.pop(shard, []))
            pending[shard] = self.handle.propose.remote(batch, shard_key=shard)
        deadline = now + self.timeout_s
        out: list[Proposal | None] = [None] * len(inputs)
        errors = []
        for shard, response in pending.items():
            try:
                replies = response.result(timeout_s=max(deadline - time.monotonic(), 1e-3))
            except Exception as e:  # noqa: BLE001 - timeout, dead replica, deleted app: all mean "no guesses"
                errors.append(f"{type(e).__name__}: {e}"[:200])
                _cancel(response)
                continue
            for i, reply in zip(shards[shard], replies):
                out[i] = self.tracker.on_reply(inputs[i].request_id, calls[i], reply)
        if errors:
            self.num_failed_calls += len(errors)
            self._down_until = time.monotonic() + self.cooldown_s
            self.cooldown_s = min(max(self.cooldown_s * 2, 0.05), self.max_cooldown_s)
            if len(errors) == len(pending):
                raise ProposerUnavailable(f"{len(errors)} draft call(s) failed: {errors[0]}")
            log.info("%d of %d draft calls failed: %s", len(errors), len(pending), errors[0])
        else:
            self.cooldown_s = self.base_cooldown_s
        return out

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            for sid in self.tracker.release([rid]):
                self._release.setdefault(shard_of(rid, self.num_shards), []).append(sid)


def _cancel(response: Any) -> None:
    """Best effort: a late reply is useless. cancel() re-raises the call's own failure (already
    counted above) when the call had failed rather than timed out."""
    try:
        response.cancel()
    except Exception:  # noqa: BLE001, S110
        pass
