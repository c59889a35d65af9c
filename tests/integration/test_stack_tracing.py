"""One trace per request across gateway → replica → engine, with the real AsyncEngine on the tiny
model, collected by an in-memory exporter. The hops run in this process (the replica is called
through LocalLLMClient, which carries the same ReplicaRequest and trace carrier as the Ray handle),
so every span lands in one exporter; the cross-process path is the same dict."""
import json
import os

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.config import StackConfig
from services.gateway.gateway import Gateway
from services.gateway.service import LocalLLMClient
from services.gen.inference.v1 import inference_pb2 as pb
from services.serving.llm_server import LLMServer

pytestmark = pytest.mark.integration


class Ctx:
    def __init__(self, md):
        self.md, self._code = md, None

    def invocation_metadata(self):
        return self.md

    def set_code(self, c):
        self._code = c

    def code(self):
        return self._code

    def set_details(self, d):
        self.details = d

    def set_trailing_metadata(self, md):
        self.trailing = md


@pytest.fixture
def exporter():
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exp = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    return exp


async def test_one_trace_gateway_replica_engine(tiny_model_dir, tmp_path, exporter):
    model = tiny_model_dir
    if not os.path.isfile(os.path.join(model, "config.json")):
        pytest.skip(f"no model at {model}")
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": "k", "tenant": "acme"}]}))
    cfg = StackConfig.from_args({"model": model, "api_keys_file": str(keys),
                                 "engine_max_model_len": 256, "engine_num_kv_blocks": 64})
    server = LLMServer(cfg)   # the default engine class: services.engine.async_engine:AsyncEngine
    try:
        gw = Gateway(cfg, LocalLLMClient(server))
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        ctx = Ctx([("authorization", "Bearer k"), ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")])
        reply = await gw.Generate(pb.GenerateRequest(model="tiny", prompt="Hello there", max_tokens=4,
                                                     temperature=0), ctx)
        assert ctx.code() is None and reply.usage.completion_tokens > 0
    finally:
        server.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {"gateway.Generate", "llm_server.generate", "engine.queue", "engine.prefill", "engine.decode"} <= set(spans)
    assert {format(s.context.trace_id, "032x") for s in spans.values()} == {trace_id}
    gw_span, replica = spans["gateway.Generate"], spans["llm_server.generate"]
    assert gw_span.parent.span_id == 0x00f067aa0ba902b7
    assert replica.parent.span_id == gw_span.context.span_id
    for phase in ("engine.queue", "engine.prefill", "engine.decode"):
        s = spans[phase]
        assert s.parent.span_id == replica.context.span_id
        assert replica.start_time - 5e7 <= s.start_time <= s.end_time <= replica.end_time + 5e7   # within 50 ms
    assert gw_span.attributes["inference.tenant"] == "acme"
