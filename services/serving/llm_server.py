"""LLMServer: one engine per Ray Serve replica (one GPU on GPU nodes, the CPU locally).

The engine class is injected (Ray Serve LLM's habit): `engine_cls` is an import path
"module:Class" or a class, constructed with an EngineConfig; tests inject a fake. The replica
 - refuses work it cannot queue (engine waiting queue at INFER_LLM_MAX_QUEUED_REQUESTS → 429),
 - validates against the model before admission (→ 400 naming the field),
 - aborts the engine request when the caller cancels (Ray Serve cancels this generator) or the
   request's deadline passes (→ 408), so its KV blocks are freed at once,
 - turns the engine's per-request timestamps into queue / prefill / decode spans,
 - fails Ray Serve's health check when the engine loop is dead or stuck (Serve then restarts it),
 - drains on shutdown: Serve stops routing and waits for in-flight requests; then the engine stops.
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode

from services.config import StackConfig
from services.engine.sampling_params import SamplingParams
from services.prefix_cache.tier import kv_tier_for_replica
from services.serving.wire import (ChoiceDelta, ErrorInfo, ReplicaChunk, ReplicaRequest, Timing,
                                   TokenLogprob, TopLogprob)
from services.telemetry import metrics, tracing

log = logging.getLogger(__name__)
DEFAULT_ENGINE = "services.engine.async_engine:AsyncEngine"


def load_class(path_or_cls: Any) -> Any:
    if not isinstance(path_or_cls, str):
        return path_or_cls
    module, _, name = path_or_cls.partition(":")
    return getattr(importlib.import_module(module), name)


def _replica_id() -> str:
    try:
        from ray import serve
        return serve.get_replica_context().replica_id.unique_id
    except Exception:   # not inside a Serve replica (unit tests, benchmarks)
        return "local"


class LLMServer:
    def __init__(self, config: StackConfig, engine_cls: Any = DEFAULT_ENGINE, grammar_handle: Any = None,
                 draft_handle: Any = None) -> None:
        tracing.setup_tracing(config.service_name, config.otel_exporter, config.otel_endpoint)
        self._config = config
        self._model = config.model_name
        # [kv-tier] Redis KV tier + prefix index for this replica (None without INFER_REDIS_URL);
        # the namespace is the one the router reads (services/app.py: cfg.model_name).
        kv_tier = kv_tier_for_replica(config.redis_url, config.model_name, _replica_id(),
                                      write_policy=config.kv_tier_write_policy)
        engine_kwargs: dict[str, Any] = {"kv_tier": kv_tier} if kv_tier else {}
        method = config.engine.speculative_method
        if method is not None and engine_cls == DEFAULT_ENGINE:
            # The proposer enters through LLMEngine's Proposer seam; AsyncEngine wraps that engine.
            from services.draft import build_proposer
            from services.engine.llm_engine import LLMEngine
            proposer = build_proposer(method, draft_model=config.draft_model or None, device=config.engine.device,
                                      draft_handle=draft_handle)
            engine_kwargs = {"engine": LLMEngine(config.engine, {method: proposer}, kv_tier=kv_tier)}
        self._engine = load_class(engine_cls)(config.engine, **engine_kwargs)
        self._tokenizer = getattr(self._engine, "tokenizer", None)
        self._grammar_client = None
        if grammar_handle is not None:   # compile in the shared GrammarService, else in this process
            from services.grammar.client import GrammarClient
            self._grammar_client = GrammarClient(grammar_handle, self._tokenizer,
                                                 vocab_size=self._engine.model_config.vocab_size)
        else:   # this process's compilers share compilations through Redis too
            from services.grammar import local
            local.configure(redis_url=config.redis_url or None, num_workers=config.grammar_workers,
                            warm_up=config.grammar_warm_up, compile_threads=config.grammar_compile_threads)
        self._draining = False
        self._collector = metrics.register_engine(self._engine.stats, self._model, _replica_id())
        inner = getattr(self._engine, "engine", None)   # AsyncEngine wraps the LLMEngine
        if getattr(inner, "speculator", None) is not None:
            self._spec_collector = metrics.register_spec(lambda: inner.speculator.stats, self._model, _replica_id())

    # ---- the request path -------------------------------------------------------------------
    async def generate(self, req: ReplicaRequest) -> AsyncIterator[ReplicaChunk]:
        refusal = await self._admit(req)
        if isinstance(refusal, ErrorInfo):
            yield ReplicaChunk(error=refusal)
            return
        params = refusal
        span = tracing.start_span("llm_server.generate", tracing.extract(req.trace_carrier),
                                  SpanKind.SERVER, {"inference.request_id": req.request_id,
                                                    "inference.prompt_tokens": len(req.prompt_token_ids)})
        stream = self._engine.generate(req.prompt_token_ids, params, req.request_id, priority=req.priority,
                                       cache_salt=req.cache_salt, prompt=req.prompt)
        last = None
        top_n = params.logprobs
        try:
            while True:
                remaining = None if req.deadline is None else req.deadline - time.time()
                try:
                    if remaining is None:
                        out = await anext(stream)
                    elif remaining <= 0:
                        raise TimeoutError
                    else:
                        async with asyncio.timeout(remaining):   # (wait_for would start a task per message)
                            out = await anext(stream)
                except StopAsyncIteration:
                    break
                except RuntimeError as e:   # the engine loop died (EngineDeadError): Serve will restart us
                    span.set_status(Status(StatusCode.ERROR, str(e)))
                    yield ReplicaChunk(error=ErrorInfo(503, f"The model replica failed: {e}; retry."))
                    return
                except TimeoutError:
                    await self._engine.abort(req.request_id)
                    span.set_status(Status(StatusCode.ERROR, "deadline exceeded"))
                    yield ReplicaChunk(error=ErrorInfo(408, "The request's deadline passed before it finished.",
                                                       code="deadline_exceeded"))
                    return
                last = out
                yield self._chunk(out, top_n)
        except asyncio.CancelledError:
            # The caller went away: Serve cancelled us; the engine's generator aborts on close too.
            span.set_status(Status(StatusCode.ERROR, "cancelled"))
            await self._engine.abort(req.request_id)
            raise
        finally:
            await stream.aclose()
            if last is not None and last.metrics is not None:
                tracing.record_engine_phases(span, last.metrics)
                if last.metrics.first_scheduled_time is not None:
                    metrics.QUEUE_TIME.labels(self._model).observe(
                        last.metrics.first_scheduled_time - last.metrics.arrival_time)
            span.end()

    async def _admit(self, req: ReplicaRequest) -> SamplingParams | ErrorInfo:
        if self._draining:
            metrics.REPLICA_REJECTED.labels(self._model, "draining").inc()
            return ErrorInfo(503, "This replica is shutting down; retry.", retry_after=1.0)
        limit = self._config.llm_max_queued_requests
        stats = self._engine.stats()
        if not stats.is_alive:
            return ErrorInfo(503, "The model replica's engine is not running; retry.", retry_after=1.0)
        if stats.num_waiting >= limit:
            metrics.REPLICA_REJECTED.labels(self._model, "queue_full").inc()
            return ErrorInfo(429, f"The replica's queue is full ({limit} waiting requests); retry later.",
                             code="queue_full", retry_after=1.0)
        try:
            params = SamplingParams(**req.sampling, speculative=req.speculative,
                                    output_kind="delta")   # the wire carries deltas only
            if req.structured is not None and self._grammar_client is not None:
                params.grammar = await self._grammar_client.build(req.structured)
            elif req.structured is not None:
                # Compiling can take milliseconds to seconds (cached after): keep the event loop free.
                params.grammar = await asyncio.to_thread(self._build_grammar, req.structured)
            self._engine.validate(req.prompt_token_ids, params)
        except ValueError as e:   # GrammarError is a ValueError carrying `param`
            metrics.REPLICA_REJECTED.labels(self._model, "invalid").inc()
            msg = getattr(e, "message", None) or str(e)
            param = getattr(e, "param", None) or (msg.split(" ", 1)[0] if " must " in msg else None)
            return ErrorInfo(400, msg, param=param, code="invalid_value")
        except RuntimeError as e:   # GrammarServiceUnavailable: the compile service is down or slow
            return ErrorInfo(503, f"Structured output is unavailable right now: {e}", retry_after=1.0)
        return params

    def _build_grammar(self, structured: dict[str, Any]) -> Any:
        """Compiles the structured-output spec with services.grammar (ValueError → 400)."""
        from services.grammar import build_grammar
        vocab = getattr(getattr(self._engine, "model_config", None), "vocab_size", None)
        return build_grammar(structured, self._tokenizer, vocab_size=vocab)

    def _chunk(self, out: Any, top_n: int | None) -> ReplicaChunk:
        choices = []
        for c in out.outputs:
            lps = None
            if top_n is not None and c.delta_logprobs is not None:
                lps = [self._token_logprob(tid, d, top_n) for tid, d in zip(c.delta_token_ids, c.delta_logprobs)]
            choices.append(ChoiceDelta(c.index, c.delta_text, list(c.delta_token_ids), lps,
                                       c.finish_reason, c.stop_reason))
        timing = None
        m = out.metrics
        if out.finished and m is not None:
            end = m.finished_time or m.last_token_time or m.first_token_time
            timing = Timing(queue_s=_span(m.arrival_time, m.first_scheduled_time),
                            prefill_s=_span(m.first_scheduled_time, m.first_token_time),
                            decode_s=_span(m.first_token_time, end))
        return ReplicaChunk(choices, len(out.prompt_token_ids), out.num_cached_tokens, out.finished, timing)

    def _token_logprob(self, token_id: int, d: dict, top_n: int) -> TokenLogprob:
        chosen = d.get(token_id)
        ranked = sorted(d.items(), key=lambda kv: (kv[1].rank is None, kv[1].rank or 0, -kv[1].logprob))
        top = [TopLogprob(t, self._decode(t, lp.decoded_token), lp.logprob) for t, lp in ranked[:top_n]]
        return TokenLogprob(token_id, self._decode(token_id, chosen.decoded_token if chosen else None),
                            chosen.logprob if chosen else float("nan"), top)

    def _decode(self, token_id: int, decoded: str | None) -> str:
        if decoded is not None or self._tokenizer is None:
            return decoded or ""
        return self._tokenizer.decode([token_id])

    # ---- control plane ----------------------------------------------------------------------
    def check_health(self) -> None:
        """Ray Serve's replica health check: raises when the engine loop is dead or stuck."""
        self._engine.check_health()

    def ready(self) -> dict[str, Any]:
        self._engine.check_health()
        return {"model": self._model, "draining": self._draining}

    def stats(self) -> dict[str, Any]:
        s = self._engine.stats()
        return dataclasses.asdict(s) if dataclasses.is_dataclass(s) else dict(vars(s))

    def metrics_text(self) -> bytes:
        return metrics.replica_text()

    def shutdown(self) -> None:
        self._draining = True
        metrics.unregister_engine(self._collector)
        self._engine.shutdown()

    def __del__(self) -> None:
        # Serve calls this after graceful_shutdown_timeout_s of draining in-flight requests.
        if not self._draining and hasattr(self, "_engine"):
            self.shutdown()


def _span(t0: float | None, t1: float | None) -> float:
    return 0.0 if t0 is None or t1 is None else max(0.0, t1 - t0)
