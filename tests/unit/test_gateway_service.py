"""The gateway's request path over an in-process LLMServer with the fake engine injected:
gRPC methods end to end, error mapping, cancellation and deadlines reaching the engine, queue
bound, and one trace holding gateway, replica and engine spans."""
import asyncio
import json

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.config import StackConfig
from services.gateway.gateway import Gateway
from services.gateway.service import LocalLLMClient
from services.gen.inference.v1 import inference_pb2 as pb
from services.serving.fake_engine import FakeEngine, FakeTokenizer
from services.serving.llm_server import LLMServer

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def tracer_provider():
    # OTel accepts one global provider per process: join the one another test module installed.
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    yield


class Ctx:
    """The parts of Serve's RayServegRPCContext the gateway uses."""

    def __init__(self, **metadata):
        self.metadata = list(metadata.items())
        self._code, self._details, self.trailing = None, "", []

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self._code = code

    def code(self):
        return self._code

    def set_details(self, details):
        self._details = details

    def details(self):
        return self._details

    def set_trailing_metadata(self, md):
        self.trailing = list(md)


@pytest.fixture
def stack(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"vocab_size": 512, "max_position_embeddings": 256}))
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": "k", "tenant": "acme"},
                                         {"key": "slow", "tenant": "tiny-quota", "rate_limit_tokens_per_s": 0.01,
                                          "burst": 40}]}))
    cfg = StackConfig(model=str(tmp_path / "model"), api_keys_file=str(keys), llm_max_queued_requests=2,
                      engine=StackConfig.from_args({"model": str(tmp_path / "model")}).engine)
    server = LLMServer(cfg, engine_cls=FakeEngine)
    gw = Gateway(cfg, LocalLLMClient(server), tokenizer=FakeTokenizer())
    yield gw, server._engine
    server.shutdown()


AUTH = {"authorization": "Bearer k"}


async def test_generate_unary_and_stream_agree(stack):
    gw, engine = stack
    req = pb.GenerateRequest(model="tiny", prompt="ab", max_tokens=5, n=2, logprobs=1)
    ctx = Ctx(**AUTH)
    unary = await gw.Generate(req, ctx)
    assert ctx.code() is None
    assert [c.finish_reason for c in unary.choices] == ["length", "length"]
    assert unary.usage.prompt_tokens == 2 and unary.usage.completion_tokens == 10
    assert len(unary.choices[0].logprobs) == 5 and len(unary.choices[0].logprobs[0].top_logprobs) == 1
    parts = [m async for m in gw.GenerateStream(req, Ctx(**AUTH))]
    for i in range(2):
        assert "".join(c.text for m in parts for c in m.choices if c.index == i) == unary.choices[i].text
    assert parts[-1].usage.total_tokens == 12 and parts[-1].timing.e2e_s > 0


async def test_chat_applies_template_and_stops(stack):
    gw, _ = stack
    reply = await gw.Chat(pb.ChatRequest(model="tiny", messages=[pb.ChatMessage(role="user", content="hi")],
                                         max_tokens=8, stop=["?"]), Ctx(**AUTH))
    # template "<user>hi\n<assistant>" ends in '>' (62); the fake continues 63 '?', a stop string
    assert reply.choices[0].message.content == "" and reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == len("<user>hi\n<assistant>")


@pytest.mark.parametrize("req,md,code", [
    (pb.GenerateRequest(model="tiny", prompt="x"), {}, grpc.StatusCode.UNAUTHENTICATED),
    (pb.GenerateRequest(model="other", prompt="x"), AUTH, grpc.StatusCode.NOT_FOUND),
    (pb.GenerateRequest(model="tiny", prompt="x", max_tokens=10_000), AUTH, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(model="tiny", prompt="x", top_p=7), AUTH, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(model="tiny", prompt_token_ids=pb.TokenIds(ids=[99999])), AUTH,
     grpc.StatusCode.INVALID_ARGUMENT),
])
async def test_errors_map_to_status_codes(stack, req, md, code):
    gw, engine = stack
    ctx = Ctx(**md)
    await gw.Generate(req, ctx)
    assert ctx.code() == code and ctx.details()
    assert engine.stats().num_running == 0


async def test_tenant_quota_gives_retry_after(stack):
    gw, _ = stack
    req = pb.GenerateRequest(model="tiny", prompt="x" * 10, max_tokens=20)
    first = Ctx(authorization="Bearer slow")
    await gw.Generate(req, first)
    assert first.code() is None
    second = Ctx(authorization="Bearer slow")
    await gw.Generate(req, second)
    assert second.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # needs 30, holds 40 - 30 = 10, refills 0.01/s: about 2000 s (less what refilled meanwhile)
    assert 1900 <= int(dict(second.trailing)["retry-after"]) <= 2000


async def test_cancel_mid_stream_aborts_in_engine(stack):
    gw, engine = stack
    engine.step_s = 0.01
    stream = gw.GenerateStream(pb.GenerateRequest(model="tiny", prompt="a", max_tokens=200), Ctx(**AUTH))
    await anext(stream)
    assert engine.stats().num_running == 1 and engine.stats().kv_cache_usage > 0
    await stream.aclose()          # what Serve does when the gRPC client cancels
    assert engine.stats().num_running == 0 and engine.stats().kv_cache_usage == 0
    assert len(engine.aborted) == 1


async def test_deadline_aborts_in_engine(stack):
    gw, engine = stack
    engine.step_s = 0.01
    ctx = Ctx(**AUTH, **{"x-request-timeout-seconds": "0.2"})
    await gw.Generate(pb.GenerateRequest(model="tiny", prompt="a", max_tokens=200), ctx)
    assert ctx.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert engine.stats().num_running == 0 and len(engine.aborted) == 1


async def test_full_queue_is_refused_with_retry(stack):
    gw, engine = stack
    engine.step_s = 0.05
    req = pb.GenerateRequest(model="tiny", prompt="a", max_tokens=40)
    # 4 run (max_num_seqs), 2 wait (the queue bound), the 7th is refused at once.
    tasks = [asyncio.create_task(gw.Generate(req, Ctx(**AUTH))) for _ in range(6)]
    while engine.stats().num_waiting < 2:
        await asyncio.sleep(0.01)
    ctx = Ctx(**AUTH)
    await gw.Generate(req, ctx)
    assert ctx.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and dict(ctx.trailing)["retry-after"] == "1"
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_list_models_and_health(stack):
    gw, engine = stack
    models = await gw.ListModels(pb.ListModelsRequest(), Ctx(**AUTH))
    assert [m.id for m in models.models] == ["tiny"] and models.models[0].max_model_len == 256
    from grpc_health.v1 import health_pb2
    ok = await gw.Check(health_pb2.HealthCheckRequest(service="inference.v1.Inference"), Ctx())
    assert ok.status == health_pb2.HealthCheckResponse.SERVING
    engine.alive = False
    bad = await gw.Check(health_pb2.HealthCheckRequest(), Ctx())
    assert bad.status == health_pb2.HealthCheckResponse.NOT_SERVING
    ctx = Ctx()
    await gw.Check(health_pb2.HealthCheckRequest(service="nope"), ctx)
    assert ctx.code() == grpc.StatusCode.NOT_FOUND


async def test_one_trace_across_gateway_replica_engine(stack):
    gw, _ = stack
    EXPORTER.clear()
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await gw.Generate(pb.GenerateRequest(model="tiny", prompt="ab", max_tokens=3),
                      Ctx(**AUTH, traceparent=parent))
    spans = {s.name: s for s in EXPORTER.get_finished_spans()}
    assert {"gateway.Generate", "llm_server.generate", "engine.queue", "engine.prefill",
            "engine.decode"} <= set(spans)
    assert {s.context.trace_id for s in spans.values()} == {0x0af7651916cd43dd8448eb211c80319c}
    assert spans["llm_server.generate"].parent.span_id == spans["gateway.Generate"].context.span_id
    assert spans["engine.decode"].parent.span_id == spans["llm_server.generate"].context.span_id


async def test_stream_refusal_raises_after_setting_the_code(stack):
    from services.gateway.grpc_api import StreamError
    gw, _ = stack
    ctx = Ctx()
    with pytest.raises(StreamError):
        [m async for m in gw.ChatStream(pb.ChatRequest(model="tiny"), ctx)]
    assert ctx.code() == grpc.StatusCode.UNAUTHENTICATED


def test_fast_encoder_gives_the_tokenizers_own_ids(tiny_model_dir):
    from transformers import AutoTokenizer

    from services.gateway.service import fast_encoder
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    encode = fast_encoder(tok)
    for text in ["The quick brown fox", "", " leading space", "héllo wörld 🤖\n\n  code:\tx=1", "word " * 2000]:
        for special in (True, False):
            assert encode(text, add_special_tokens=special) == tok.encode(text, add_special_tokens=special)
    assert fast_encoder(FakeTokenizer())("ab") == [97, 98]


def test_request_dict_reads_messages_as_message_to_dict_does():
    from google.protobuf.json_format import MessageToDict

    from services.gateway.grpc_api import _to_dict
    gen = pb.GenerateRequest(model="m", prompt="x", max_tokens=4, temperature=0.7, top_p=0.9, seed=12345678901,
                             stop=["a", "b"], stop_token_ids=[1, 2], logit_bias={5: 1.5, -1: 0.1}, ignore_eos=False,
                             prompt_token_ids=pb.TokenIds(ids=[1, 2, 3]), choice=["x", "y"], priority=-3)
    gen.speculative.SetInParent()   # present but empty
    gen.response_format.json_schema.name = "n"
    chat = pb.ChatRequest(model="m", messages=[pb.ChatMessage(role="user", content="hi")], logprobs=True,
                          top_logprobs=2)
    for msg in (gen, chat, pb.GenerateRequest()):
        want = MessageToDict(msg, preserving_proto_field_name=True)
        if "seed" in want:
            want["seed"] = int(want["seed"])   # proto3 JSON writes int64 as a string
        assert _to_dict(msg) == want
    assert _to_dict(gen)["temperature"] == 0.7   # the float32's shortest decimal, not 0.699999988
