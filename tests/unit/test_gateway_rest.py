"""The OpenAI REST surface in process (ASGI, no Serve): status codes, error shape, SSE framing,
auth on every /v1 route, metrics text. The replica is an in-process LLMServer with the fake engine."""
import json

import httpx
import pytest

from services.config import StackConfig
from services.gateway import gateway as gateway_module
from services.gateway.gateway import Gateway, app
from services.gateway.service import LocalLLMClient
from services.serving.fake_engine import FakeEngine, FakeTokenizer
from services.serving.llm_server import LLMServer

AUTH = {"Authorization": "Bearer k"}
V1_ROUTES = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]


@pytest.fixture
async def client(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 512, "max_position_embeddings": 256}))
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": "k", "tenant": "acme"},
                                         {"key": "q", "tenant": "quota", "rate_limit_tokens_per_s": 0.01, "burst": 30}]}))
    cfg = StackConfig(model=str(tmp_path), api_keys_file=str(keys), max_body_bytes=4096,
                      engine=StackConfig.from_args({"model": str(tmp_path)}).engine)
    server = LLMServer(cfg, engine_cls=FakeEngine)
    gateway_module._local = Gateway(cfg, LocalLLMClient(server), tokenizer=FakeTokenizer())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        yield c
    gateway_module._local = None
    server.shutdown()


def assert_openai_error(r: httpx.Response, status: int, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


@pytest.mark.parametrize("method,path", V1_ROUTES)
@pytest.mark.parametrize("header", [None, "Bearer wrong", "k", "Basic k"])
async def test_every_v1_route_needs_a_valid_key(client, method, path, header):
    headers = {"Authorization": header} if header else {}
    r = await client.request(method, path, headers=headers, json={"model": "tiny", "prompt": "x"})
    assert_openai_error(r, 401)


async def test_open_routes(client):
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/ready")).status_code == 200
    text = (await client.get("/metrics")).text
    assert "inference_running_requests" in text and "inference_kv_cache_usage_ratio" in text
    assert_openai_error(await client.get("/nope"), 404)


async def test_completion_and_models(client):
    models = (await client.get("/v1/models", headers=AUTH)).json()
    assert models["data"][0]["id"] == "tiny"
    r = await client.post("/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": "ab", "max_tokens": 3,
                                                                 "echo": True, "logprobs": 1})
    body = r.json()
    assert body["choices"][0]["text"] == "abcde" and body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["logprobs"]["tokens"] == ["c", "d", "e"]
    assert body["choices"][0]["logprobs"]["text_offset"] == [2, 3, 4]


async def test_chat_sse_stream_with_usage(client):
    r = await client.post("/v1/chat/completions", headers=AUTH, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2,
        "stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e[len("data: "):] for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = {0: "", 1: ""}
    for c in chunks[1:-1]:
        for ch in c["choices"]:
            text[ch["index"]] += ch["delta"].get("content", "")
    assert len(text[0]) == 4 and len(text[1]) == 4 and text[0] != text[1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("content,status,param", [
    (b"{not json", 400, None),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 1000}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "extra_field": 1}).encode(), 400, "extra_field"),
    (json.dumps({"model": "gpt-9", "prompt": "x"}).encode(), 404, "model"),
    (json.dumps({"model": "tiny", "prompt": "x" * 5000}).encode(), 413, None),
])
async def test_bad_input_is_a_4xx_in_openai_shape(client, content, status, param):
    r = await client.post("/v1/completions", headers={**AUTH, "Content-Type": "application/json"}, content=content)
    assert_openai_error(r, status, param)


async def test_quota_burst_gives_429_with_retry_after(client):
    q = {"Authorization": "Bearer q"}
    body = {"model": "tiny", "prompt": "abcd", "max_tokens": 10}   # costs 14 of a 30-token burst
    codes = [(await client.post("/v1/completions", headers=q, json=body)).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    r = await client.post("/v1/completions", headers=q, json=body)
    assert_openai_error(r, 429)
    assert int(r.headers["Retry-After"]) >= 1
    assert (await client.post("/v1/completions", headers=AUTH, json=body)).status_code == 200  # other tenant
