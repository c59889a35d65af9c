"""The engine for servers: `LLMEngine` stepping on a background thread, asyncio streams in front.

Requests and aborts enter through a thread-safe queue and are applied between steps; outputs go
back to each request's asyncio.Queue via `call_soon_threadsafe`. Cancelling a consumer of
`generate()` aborts its request, which frees its KV blocks before the next step. If a step raises,
every in-flight request gets the error and the engine reports itself dead (`check_health`), so the
serving layer restarts the replica rather than serve from a broken state.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.engine.config import EngineConfig
from services.engine.llm_engine import LLMEngine
from services.engine.outputs import RequestOutput
from services.engine.sampling_params import SamplingParams


@dataclass(slots=True, frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    last_step_time: float
    is_alive: bool


class EngineDeadError(RuntimeError):
    pass


_STOP = object()
logger = logging.getLogger(__name__)


class AsyncEngine:
    STUCK_AFTER_S = 60.0   # a step running longer than this marks the loop as stuck

    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None, kv_tier=None):
        self.engine = engine or LLMEngine(config, kv_tier=kv_tier)   # [kv-tier] optional KVTier
        self.config = config
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._error: BaseException | None = None
        self._step_started: float | None = None
        self.last_step_time = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    # ---- facts for the serving layer ---------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.hf_config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.validate(prompt_token_ids, params)

    # ---- requests ------------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       priority: int = 0, cache_salt: str | None = None,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        if self._error is not None:
            raise EngineDeadError(f"engine loop is dead: {self._error!r}")
        self.engine.validate(prompt_token_ids, params)
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._inbox.put(("add", request_id, list(prompt_token_ids), params, priority, cache_salt, prompt))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._inbox.put(("abort", request_id))
                self._wake.set()
            self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    # ---- health and stats --------------------------------------------------------------------
    def check_health(self) -> None:
        if self._error is not None or not self._thread.is_alive():
            raise EngineDeadError(f"engine loop is dead: {self._error!r}")
        started = self._step_started
        if started is not None and time.monotonic() - started > self.STUCK_AFTER_S:
            raise EngineDeadError(f"engine step has been running for {time.monotonic() - started:.0f}s")

    def stats(self) -> EngineStats:
        e = self.engine
        return EngineStats(e.num_running, e.num_waiting, e.kv.usage, e.kv.num_free_blocks, e.kv.num_blocks,
                           e.kv.prefix_queries, e.kv.prefix_hits, e.scheduler.num_preemptions,
                           e.prompt_tokens_total, e.generation_tokens_total, self.last_step_time,
                           self._error is None and self._thread.is_alive())

    def shutdown(self) -> None:
        self._inbox.put(_STOP)
        self._wake.set()
        self._thread.join(timeout=10)
        if self.engine.kv_tier is not None:   # [kv-tier] write what is queued, close connections
            self.engine.kv_tier.close()

    # ---- the loop thread -----------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _apply_inbox(self) -> bool:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if cmd is _STOP:
                return False
            if cmd[0] == "add":
                _, rid, ids, params, priority, salt, prompt = cmd
                if rid not in self._streams:
                    continue    # cancelled before it was admitted
                try:
                    self.engine.add_request(rid, ids, params, priority=priority, cache_salt=salt)
                    if prompt is not None:
                        self.engine.groups[rid].prompt = prompt
                except ValueError as e:
                    self._deliver(rid, e)
            else:
                self.engine.abort_request(cmd[1])

    def _loop(self) -> None:
        try:
            while self._apply_inbox():
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    self.last_step_time = time.monotonic()
                    continue
                self._step_started = time.monotonic()
                outputs = self.engine.step()
                self._step_started = None
                self.last_step_time = time.monotonic()
                for out in outputs:
                    self._deliver(out.request_id, out)
        except BaseException as e:  # noqa: BLE001 - every waiter must hear of it
            self._error = e
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"engine step failed: {e!r}"))
            logger.exception("engine loop died; every in-flight request was failed")
