"""OpenTelemetry tracing: the one place that installs a tracer provider and an exporter.

One trace per request: the gateway extracts the caller's W3C `traceparent` (HTTP header or gRPC
metadata), opens its span, and injects the context into a plain dict that travels with the Ray
handle call; the LLM replica extracts it, opens its span, and turns the engine's per-request
timestamps into child spans (queue / prefill / decode). Exporter "none" installs nothing: spans
are then non-recording but the incoming trace context still flows through every hop.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind

TRACER_NAME = "inference-stack"
_lock = threading.Lock()
_configured: str | None = None


def setup_tracing(service_name: str, exporter: str = "none", endpoint: str = "") -> None:
    """Installs the process-wide tracer provider once (idempotent; later calls are no-ops)."""
    global _configured
    with _lock:
        if _configured is not None or exporter == "none":
            _configured = _configured or exporter
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if exporter == "console":
            span_exporter: Any = ConsoleSpanExporter()
        elif exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            span_exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
        else:
            raise ValueError(f'otel exporter must be "none", "console" or "otlp", got {exporter!r}')
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
        trace.set_tracer_provider(provider)
        _configured = exporter


_TRACER = trace.get_tracer(TRACER_NAME)   # a proxy: it follows a provider installed later


def tracer() -> trace.Tracer:
    return _TRACER


def extract(carrier: Mapping[str, str] | None) -> otel_context.Context | None:
    """The trace context carried by HTTP headers, gRPC metadata or a handle-call dict (None for an
    empty one: spans then start from the current context, as they would from what it extracts to)."""
    return propagate.extract(dict(carrier)) if carrier else None


def inject(ctx: otel_context.Context | None = None) -> dict[str, str]:
    """A plain dict (picklable, header-shaped) holding the current trace context."""
    carrier: MutableMapping[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return dict(carrier)


def carrier_of(span: Span) -> dict[str, str]:
    """The trace context to send on with a call made under `span`: empty when it carries none
    (tracing off and no caller's context), without building a context to find that out."""
    return inject(trace.set_span_in_context(span)) if span.get_span_context().is_valid else {}


def start_span(name: str, parent: otel_context.Context | None = None,
               kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, Any] | None = None) -> Span:
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        # No provider installed (exporter "none"): the span the no-op tracer would give, which carries
        # the parent's context on, without the proxy and no-op tracer layers (this is on every request).
        return trace.NonRecordingSpan(trace.get_current_span(parent).get_span_context())
    return tracer().start_span(name, context=parent, kind=kind, attributes=dict(attributes or {}))


# OTel wants epoch nanoseconds; the engine stamps RequestMetrics with time.time() ("wall").
def _epoch_ns(t_monotonic: float, offset: float) -> int:
    return int((t_monotonic + offset) * 1e9)


def record_engine_phases(parent: Span, metrics: Any, clock: str = "wall") -> None:
    """Child spans engine.queue / engine.prefill / engine.decode from a RequestMetrics.

    `metrics` has arrival_time, first_scheduled_time, first_token_time, finished_time (seconds;
    `clock` says whether they are time.monotonic() or time.time() stamps). Absent phases are skipped.
    """
    if metrics is None or not parent.get_span_context().is_valid:
        return
    offset = time.time() - time.monotonic() if clock == "monotonic" else 0.0
    ctx = trace.set_span_in_context(parent)
    arrival = metrics.arrival_time
    scheduled = metrics.first_scheduled_time
    first = metrics.first_token_time
    end = metrics.finished_time or metrics.last_token_time
    phases = (("engine.queue", arrival, scheduled), ("engine.prefill", scheduled, first),
              ("engine.decode", first, end))
    for name, t0, t1 in phases:
        if t0 is None or t1 is None:
            continue
        span = tracer().start_span(name, context=ctx, start_time=_epoch_ns(t0, offset))
        if name == "engine.prefill":
            span.set_attribute("inference.cached_tokens", int(getattr(metrics, "num_cached_tokens", 0)))
        if name == "engine.decode" and (getattr(metrics, "spec_verify_steps", 0)
                                        or getattr(metrics, "spec_fallbacks", 0)):
            span.set_attributes(spec_attributes(metrics))
        span.end(end_time=_epoch_ns(max(t0, t1), offset))


def spec_attributes(metrics: Any) -> dict[str, int | float]:
    """The decode span's speculative-decoding attributes, from a RequestMetrics."""
    proposed, accepted, steps = metrics.spec_proposed_tokens, metrics.spec_accepted_tokens, metrics.spec_verify_steps
    return {"inference.spec.proposed_tokens": proposed, "inference.spec.accepted_tokens": accepted,
            "inference.spec.acceptance_rate": accepted / proposed if proposed else 0.0,
            "inference.spec.verify_steps": steps,
            "inference.spec.mean_accepted_length": accepted / steps if steps else 0.0,
            "inference.spec.draft_ms": round(1e3 * metrics.spec_draft_s, 3),
            "inference.spec.fallbacks": metrics.spec_fallbacks}
