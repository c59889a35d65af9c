"""Token-budget, iteration-level scheduling (policy only: no tensors).

Each step every running request asks for `num_tokens_with_spec - num_computed_tokens` more tokens,
then waiting requests are admitted (highest priority first, FCFS inside a priority) while the token
budget, `max_num_seqs` and KV memory allow. Long prompts are split into chunks when chunked prefill
is on. When blocks run out, the lowest-priority, latest running request is preempted: its blocks are
freed (its full blocks stay in the prefix cache) and it is recomputed later from its tokens, so its
output is unchanged.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int          # tokens whose KV is computed this step (incl. draft tokens)
    block_ids: list[int]

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the request's tokens, so it yields a next token."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens >= r.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, max_model_len: int):
        self.config = config
        self.kv = block_manager
        self.max_model_len = max_model_len
        self.waiting: list[tuple[tuple[int, int], Request]] = []   # heap by sort_key
        self.running: list[Request] = []
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        heapq.heappush(self.waiting, (request.sort_key(), request))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chosen: dict[str, ScheduledRequest] = {}
        self.running.sort(key=Request.sort_key)
        for req in list(self.running):
            if req not in self.running:      # preempted earlier in this loop
                continue
            num_new = min(req.num_tokens_with_spec - req.num_computed_tokens, budget,
                          self.max_model_len - req.num_computed_tokens)
            if num_new <= 0:
                continue
            while not self.kv.allocate_slots(req, num_new):
                # The lowest-priority, latest request: never one already scheduled this step (running
                # is sorted and walked in order), so no block registered this step loses its KV.
                victim = self.running[-1]
                assert victim.request_id not in chosen
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                chosen[req.request_id] = ScheduledRequest(req, num_new, [])
                budget -= num_new
        if not out.preempted:
            self._admit_waiting(budget, chosen, out)
        for s in chosen.values():
            s.block_ids = self.kv.block_ids(s.request.request_id)
            if s.request.metrics.first_scheduled_time is None:
                s.request.metrics.first_scheduled_time = time.time()
        out.scheduled = list(chosen.values())
        return out

    def _admit_waiting(self, budget: int, chosen: dict[str, ScheduledRequest], out: SchedulerOutput) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0][1]
            hits, num_cached = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_cached
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.kv.allocate_slots(req, num_new, hits):
                # Memory is short: a higher-priority arrival may displace lower-priority running work.
                victim = self.running[-1] if self.running else None
                if victim is None or victim.sort_key() <= req.sort_key() or victim.request_id in chosen:
                    break
                self._preempt(victim, out)
                continue
            heapq.heappop(self.waiting)
            if req.metrics.first_scheduled_time is None:
                req.metrics.num_cached_tokens = num_cached
            req.num_computed_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chosen[req.request_id] = ScheduledRequest(req, num_new, [])
            budget -= num_new

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(req)
        self.add(req)
        req.status = RequestStatus.PREEMPTED

    def update(self, scheduled: list[ScheduledRequest]) -> None:
        """Advance computed tokens after the runner executed the step (before new tokens are appended)."""
        for s in scheduled:
            s.request.num_computed_tokens += s.num_new_tokens

    def finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting = [(k, r) for k, r in self.waiting if r is not req]
            heapq.heapify(self.waiting)
        self.kv.free(req)
