"""The real stack once per session: local Ray + Serve (HTTP and gRPC proxies), Gateway, one
LLMServer running the real AsyncEngine on the tiny model, real Redis (prefix-aware routing on).
Clients: the official `openai` package and the generated gRPC stubs.

Checks: unary/streaming chat and completions agree with each other (same seed) and with the
offline LLM API; n > 1; stop strings; logprobs; cancel and deadline abort in the engine (running
count and KV usage back to baseline); auth on every route of both surfaces; 429 + Retry-After; the
gateway replica's own gRPC port (INFER_DIRECT_GRPC_PORT) answers like Serve's.
"""
import json
import os
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openai import OpenAI, RateLimitError

from services.config import StackConfig
from services.engine.sampling_params import SamplingParams
from services.gen.inference.v1 import inference_pb2 as pb
from services.gen.inference.v1 import inference_pb2_grpc as pbg
from services.run import free_port

pytestmark = pytest.mark.integration
KEY, BURST_KEY = "sk-test-acme", "sk-test-burst"
MODEL = "tiny"


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir):
    path = tiny_model_dir
    if not os.path.isfile(os.path.join(path, "config.json")):
        pytest.skip(f"no model at {path} (make models)")
    return path


@pytest.fixture(scope="session")
def stack(model_dir, redis_url, tmp_path_factory):
    from services.run import LocalStack
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": KEY, "tenant": "acme"},
                                         {"key": BURST_KEY, "tenant": "bursty", "rate_limit_tokens_per_s": 0.5,
                                          "burst": 40}]}))
    cfg = StackConfig.from_args({
        "model": model_dir, "model_name": MODEL, "host": "127.0.0.1", "http_port": free_port(), "grpc_port": free_port(),
        "redis_url": redis_url, "api_keys_file": str(keys), "llm_max_queued_requests": 16,
        "direct_grpc_port": free_port(),
        "engine_max_num_seqs": 8, "engine_max_model_len": 1024,
        "engine_num_kv_blocks": 256})
    stack = LocalStack(cfg, num_cpus=2, log_to_driver=False).start()
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def oai(stack):
    return OpenAI(base_url=stack.http_url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def stub(stack):
    return pbg.InferenceStub(grpc.insecure_channel(stack.grpc_target))


@pytest.fixture(scope="session")
def offline(model_dir):
    from services.engine.llm import LLM
    return LLM(model_dir, max_model_len=1024)


def engine_stats(stack) -> dict:
    from ray import serve
    return serve.get_deployment_handle("LLMServer", app_name="inference").stats.remote().result()


def settle(stack, baseline: dict, timeout_s: float = 30.0) -> dict:
    """Polls the engine until nothing runs or waits and KV usage is back at `baseline`'s (an abort
    takes effect between engine steps, after the cancel has crossed proxy, gateway and replica)."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = engine_stats(stack)
        idle = (s["num_running"], s["num_waiting"]) == (0, 0)
        if (idle and s["kv_cache_usage"] == baseline.get("kv_cache_usage", s["kv_cache_usage"])) \
                or time.monotonic() > deadline:
            return s
        time.sleep(0.1)


MD = [("authorization", f"Bearer {KEY}")]
PROMPT = "The quick brown fox"


def test_completion_unary_stream_and_offline_agree(oai, offline):
    unary = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True) if c.choices)
    ref = offline.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert unary.choices[0].text == streamed == ref.text
    assert unary.usage.completion_tokens == len(ref.token_ids)
    seeded = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0.9, seed=7)
    a = oai.completions.create(**seeded).choices[0].text
    b = "".join(c.choices[0].text for c in oai.completions.create(**seeded, stream=True) if c.choices)
    assert a == b == offline.generate([PROMPT], SamplingParams(temperature=0.9, seed=7, max_tokens=10))[0].outputs[0].text


def test_chat_unary_stream_and_offline_agree(oai, offline):
    msgs = [{"role": "user", "content": "Say something."}]
    unary = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0.7, seed=3)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0.7, seed=3,
                                              stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ref = offline.chat(msgs, SamplingParams(temperature=0.7, seed=3, max_tokens=10)).outputs[0]
    assert unary.choices[0].message.content == streamed == ref.text
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens == len(ref.token_ids)


def test_n_choices_stop_strings_and_logprobs(oai):
    many = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, n=3, temperature=1.0, seed=11)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in many.choices)
    streamed = {0: "", 1: "", 2: ""}
    for c in oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, n=3, temperature=1.0, seed=11,
                                    stream=True):
        for ch in c.choices:
            streamed[ch.index] += ch.text
    assert streamed == {c.index: c.text for c in many.choices}

    full = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    assert len(full) > 4
    stop = full[3:5]
    cut = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]

    lp = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    info = lp.choices[0].logprobs
    assert len(info.tokens) == len(info.token_logprobs) == lp.usage.completion_tokens
    assert all(len(t) <= 2 and x <= 0 for t, x in zip(info.top_logprobs, info.token_logprobs))
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)


def test_grpc_unary_stream_chat_models_health(stub, stack, oai):
    req = pb.GenerateRequest(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    unary = stub.Generate(req, metadata=MD)
    parts = list(stub.GenerateStream(req, metadata=MD))
    assert "".join(c.text for m in parts for c in m.choices) == unary.choices[0].text
    assert unary.choices[0].text == oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12,
                                                           temperature=0).choices[0].text
    assert parts[-1].usage.completion_tokens == unary.usage.completion_tokens > 0
    assert unary.timing.e2e_s >= unary.timing.time_to_first_token_s > 0
    creq = pb.ChatRequest(model=MODEL, messages=[pb.ChatMessage(role="user", content="hi")], max_tokens=6,
                          temperature=0)
    chat = stub.Chat(creq, metadata=MD)
    assert "".join(c.message.content for m in stub.ChatStream(creq, metadata=MD) for c in m.choices) == \
        chat.choices[0].message.content
    assert [m.id for m in stub.ListModels(pb.ListModelsRequest(), metadata=MD).models] == [MODEL]
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(stack.grpc_target))
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


# Long enough (about 1000 tokens) that no CPU finishes it before the 1 s deadlines below.
LONG = dict(model=MODEL, prompt=PROMPT, max_tokens=1000, temperature=0, ignore_eos=True)


def test_rest_client_disconnect_aborts_in_engine(stack):
    base = settle(stack, {})
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", stack.http_url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                         json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            assert engine_stats(stack)["num_running"] == 1
    after = settle(stack, base)
    assert (after["num_running"], after["kv_cache_usage"]) == (0, base["kv_cache_usage"]), after
    assert after["generation_tokens_total"] - base["generation_tokens_total"] < 1000


def test_grpc_cancel_and_deadline_abort_in_engine(stack, stub):
    base = settle(stack, {})
    call = stub.GenerateStream(pb.GenerateRequest(**LONG), metadata=MD)
    next(call)
    call.cancel()
    after = settle(stack, base)
    assert (after["num_running"], after["kv_cache_usage"]) == (0, base["kv_cache_usage"]), after
    with pytest.raises(grpc.RpcError) as ei:
        stub.Generate(pb.GenerateRequest(**LONG), metadata=MD, timeout=1.0)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = settle(stack, base)
    assert (after["num_running"], after["kv_cache_usage"]) == (0, base["kv_cache_usage"]), after
    assert after["generation_tokens_total"] - base["generation_tokens_total"] < 2000


def test_rest_deadline_header_aborts_in_engine(stack):
    base = settle(stack, {})
    r = httpx.post(stack.http_url + "/v1/completions", json=LONG, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "x-request-timeout-seconds": "1"})
    assert r.status_code == 408
    after = settle(stack, base)
    assert (after["num_running"], after["kv_cache_usage"]) == (0, base["kv_cache_usage"]), after


def test_auth_on_every_route(stack, stub):
    body = {"model": MODEL, "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, stack.http_url + path, headers=headers, json=body, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, r.text)
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(stack.http_url + path, timeout=30).status_code == 200, path
    gen, chat = pb.GenerateRequest(model=MODEL, prompt="x"), pb.ChatRequest(model=MODEL)
    calls = [(stub.Generate, gen), (stub.Chat, chat), (stub.ListModels, pb.ListModelsRequest()),
             (lambda r, **kw: list(stub.GenerateStream(r, **kw)), gen),
             (lambda r, **kw: list(stub.ChatStream(r, **kw)), chat)]
    for fn, req in calls:
        for md in ([], [("authorization", "Bearer wrong")]):
            with pytest.raises(grpc.RpcError) as ei:
                fn(req, metadata=md)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_burst_gets_429_with_retry_after(stack, stub):
    burst = OpenAI(base_url=stack.http_url + "/v1", api_key=BURST_KEY, max_retries=0)
    body = dict(model=MODEL, prompt="abc", max_tokens=8)   # ~12 tokens of a 40-token burst at 0.5/s
    statuses = []
    for _ in range(5):
        try:
            burst.completions.create(**body)
            statuses.append(200)
        except RateLimitError as e:
            statuses.append(429)
            assert int(e.response.headers["retry-after"]) >= 1
            assert e.response.json()["error"]["code"] == "rate_limit_exceeded"
    assert statuses[0] == 200 and 429 in statuses
    with pytest.raises(grpc.RpcError) as ei:
        stub.Generate(pb.GenerateRequest(**body), metadata=[("authorization", f"Bearer {BURST_KEY}")])
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(ei.value.trailing_metadata())["retry-after"]) >= 1


def test_bad_input_and_metrics(stack, oai):
    r = httpx.post(stack.http_url + "/v1/completions", content=b"{oops", timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(stack.http_url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    text = httpx.get(stack.http_url + "/metrics", timeout=30).text
    for name in ("inference_requests_total", "inference_time_to_first_token_seconds_bucket",
                 "inference_e2e_latency_seconds_count", "inference_running_requests",
                 "inference_kv_cache_usage_ratio", "inference_prefix_cache_hits_total",
                 "inference_generation_tokens_total"):
        assert name in text, name


def test_direct_grpc_port_answers_like_serve(stack, stub):
    direct = grpc.insecure_channel(f"127.0.0.1:{stack.cfg.direct_grpc_port}")
    dstub = pbg.InferenceStub(direct)
    req = pb.GenerateRequest(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    want = stub.Generate(req, metadata=MD).choices[0].text
    assert dstub.Generate(req, metadata=MD).choices[0].text == want
    assert "".join(c.text for m in dstub.GenerateStream(req, metadata=MD) for c in m.choices) == want
    creq = pb.ChatRequest(model=MODEL, messages=[pb.ChatMessage(role="user", content="hi")], max_tokens=6,
                          temperature=0)
    assert "".join(c.message.content for m in dstub.ChatStream(creq, metadata=MD) for c in m.choices) == \
        stub.Chat(creq, metadata=MD).choices[0].message.content
    assert [m.id for m in dstub.ListModels(pb.ListModelsRequest(), metadata=MD).models] == [MODEL]
    health = health_pb2_grpc.HealthStub(direct)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    # Errors keep their status and message, streams included; no key is refused on every method.
    with pytest.raises(grpc.RpcError) as ei:
        list(dstub.GenerateStream(pb.GenerateRequest(model=MODEL, prompt="x", top_p=2.0), metadata=MD))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in ei.value.details()
    for fn, r in [(dstub.Generate, req), (dstub.Chat, creq), (dstub.ListModels, pb.ListModelsRequest()),
                  (lambda r, **kw: list(dstub.GenerateStream(r, **kw)), req),
                  (lambda r, **kw: list(dstub.ChatStream(r, **kw)), creq)]:
        with pytest.raises(grpc.RpcError) as ei:
            fn(r, metadata=[("authorization", "Bearer wrong")])
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The replica reports the call in flight to Serve's autoscaler; cancelled, it aborts in the engine.
    from ray import serve

    from services.app import DIRECT_ONGOING
    gateway = serve.get_deployment_handle("Gateway", app_name="inference")
    base = settle(stack, {})
    call = dstub.GenerateStream(pb.GenerateRequest(**LONG), metadata=MD)
    next(call)
    assert gateway.record_autoscaling_stats.remote().result() == {DIRECT_ONGOING: 1.0}
    call.cancel()
    after = settle(stack, base)
    assert (after["num_running"], after["kv_cache_usage"]) == (0, base["kv_cache_usage"]), after
    assert gateway.record_autoscaling_stats.remote().result() == {DIRECT_ONGOING: 0.0}


def test_structured_output_choice_regex_and_bad_grammar(oai, stub):
    pick = oai.completions.create(model=MODEL, prompt="Answer:", max_tokens=8, temperature=0.8, seed=1,
                                  extra_body={"choice": ["yes", "no"]})
    assert pick.choices[0].text in ("yes", "no")
    digits = stub.Generate(pb.GenerateRequest(model=MODEL, prompt="Code:", max_tokens=8, regex="[0-9]{3}"),
                           metadata=MD)
    assert len(digits.choices[0].text) == 3 and digits.choices[0].text.isdigit()
    r = httpx.post(oai.base_url.join("completions").__str__(), timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": MODEL, "prompt": "x", "grammar": "root ::= ("})
    assert r.status_code == 400 and r.json()["error"]["param"] == "grammar", r.text
