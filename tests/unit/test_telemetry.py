"""Telemetry: engine timestamps become correctly placed child spans; the engine collector exports
live stats under the documented names; the exporter choice is validated."""
import time

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest

from services.engine.outputs import RequestMetrics
from services.serving.fake_engine import FakeStats
from services.telemetry import tracing
from services.telemetry.metrics import EngineStatsCollector


def engine_phase_spans(metrics: RequestMetrics) -> tuple[dict, object]:
    """record_engine_phases under a parent span, routed to an in-memory exporter: ({name: span}, parent)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    parent = tracer.start_span("llm_server.generate")
    orig = tracing.tracer
    tracing.tracer = lambda: tracer   # route the helper's spans to this provider
    try:
        tracing.record_engine_phases(parent, metrics)
    finally:
        tracing.tracer = orig
    return {s.name: s for s in exporter.get_finished_spans()}, parent


def test_engine_phases_become_child_spans_at_engine_times():
    t0 = time.time()
    m = RequestMetrics(arrival_time=t0, first_scheduled_time=t0 + 0.5, first_token_time=t0 + 0.75,
                       last_token_time=t0 + 2.0, finished_time=t0 + 2.0, num_cached_tokens=32)
    spans, parent = engine_phase_spans(m)
    assert [spans[n].parent.span_id for n in ("engine.queue", "engine.prefill", "engine.decode")] == \
        [parent.get_span_context().span_id] * 3
    durations = {n: (spans[n].end_time - spans[n].start_time) / 1e9 for n in ("engine.queue", "engine.prefill",
                                                                               "engine.decode")}
    assert durations == pytest.approx({"engine.queue": 0.5, "engine.prefill": 0.25, "engine.decode": 1.25}, abs=1e-3)
    assert spans["engine.queue"].start_time == pytest.approx(t0 * 1e9, abs=1e6)
    assert spans["engine.prefill"].attributes["inference.cached_tokens"] == 32
    assert not any(k.startswith("inference.spec.") for k in spans["engine.decode"].attributes)


def test_decode_span_carries_the_requests_speculation():
    t0 = time.time()
    m = RequestMetrics(arrival_time=t0, first_scheduled_time=t0, first_token_time=t0 + 0.1, finished_time=t0 + 1,
                       spec_proposed_tokens=40, spec_accepted_tokens=30, spec_verify_steps=10, spec_draft_s=0.012,
                       spec_fallbacks=1)
    decode = engine_phase_spans(m)[0]["engine.decode"]
    assert {k: v for k, v in decode.attributes.items() if k.startswith("inference.spec.")} == {
        "inference.spec.proposed_tokens": 40, "inference.spec.accepted_tokens": 30,
        "inference.spec.acceptance_rate": 0.75, "inference.spec.verify_steps": 10,
        "inference.spec.mean_accepted_length": 3.0, "inference.spec.draft_ms": 12.0, "inference.spec.fallbacks": 1}


def test_missing_phases_are_skipped():
    # aborted while queued: never scheduled, no token
    assert engine_phase_spans(RequestMetrics(arrival_time=time.time()))[0] == {}


def test_engine_collector_exports_live_stats():
    stats = FakeStats(num_running=3, num_waiting=2, kv_cache_usage=0.25, num_free_blocks=48, num_total_blocks=64,
                      prefix_cache_queries=100, prefix_cache_hits=40, prompt_tokens_total=7,
                      generation_tokens_total=9)
    reg = CollectorRegistry()
    reg.register(EngineStatsCollector(lambda: stats, "tiny", "r1"))
    text = generate_latest(reg).decode()
    for line in ('inference_running_requests{model="tiny",replica="r1"} 3.0',
                 'inference_queue_length{model="tiny",replica="r1"} 2.0',
                 'inference_kv_cache_usage_ratio{model="tiny",replica="r1"} 0.25',
                 'inference_prefix_cache_hits_total{model="tiny",replica="r1"} 40.0',
                 'inference_prefix_cache_queries_total{model="tiny",replica="r1"} 100.0',
                 'inference_prompt_tokens_total{model="tiny",replica="r1"} 7.0',
                 'inference_generation_tokens_total{model="tiny",replica="r1"} 9.0'):
        assert line in text
    stats.num_running = 0
    assert 'inference_running_requests{model="tiny",replica="r1"} 0.0' in generate_latest(reg).decode()


def test_trace_context_round_trips_through_a_plain_dict():
    provider = TracerProvider()
    span = provider.get_tracer("t").start_span("gateway")
    from opentelemetry import trace
    carrier = tracing.inject(trace.set_span_in_context(span))
    assert carrier["traceparent"].split("-")[1] == format(span.get_span_context().trace_id, "032x")
    ctx = tracing.extract(carrier)
    assert trace.get_current_span(ctx).get_span_context().span_id == span.get_span_context().span_id


def test_bad_exporter_is_refused():
    with pytest.raises(ValueError, match="otlp"):
        tracing._configured = None
        tracing.setup_tracing("svc", "zipkin")
