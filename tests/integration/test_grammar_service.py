"""GrammarService for real: compilations shared through a real Redis by a second service instance
and by a restarted one (hit counters), Redis down = bypass, and the Ray Serve deployment reached
through GrammarClient from the replica side (errors with line/column, validate, service down → 503)."""
from __future__ import annotations

import asyncio
import socket

import pytest
from transformers import AutoTokenizer

from services.grammar.cache import GrammarCache
from services.grammar.client import GrammarClient, GrammarServiceUnavailable
from services.grammar.compiler import GrammarCompiler
from services.grammar.errors import GrammarError
from services.grammar.service import GrammarService, grammar_deployment
from services.grammar.spec import GrammarSpec
from services.grammar.tokenizer import fingerprint, tokenizer_info_from_model_dir

pytestmark = pytest.mark.integration

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
          "required": ["city"]}


@pytest.fixture(scope="module")
def info(tiny_model_dir):
    return tokenizer_info_from_model_dir(tiny_model_dir)


def unique_spec(tag: str) -> GrammarSpec:
    """A spec no other test (or earlier run against the same Redis) compiled: keeps counters exact."""
    return GrammarSpec.json_schema({**SCHEMA, "title": f"{tag}-{socket.gethostname()}-{id(object())}"})


def test_second_instance_and_restart_reuse_through_redis(info, redis_url):
    spec = unique_spec("restart")
    first = GrammarCompiler(info, cache=GrammarCache(redis_url))
    try:
        r1 = first.compile(spec)
        assert r1.source == "compiled" and first.cache.misses == 1
        assert first.compile(spec).source == "memory"
    finally:
        first.close()
    # Another replica, or this one after a restart: empty memory, same Redis.
    second = GrammarCompiler(info, cache=GrammarCache(redis_url))
    try:
        r2 = second.compile(spec)
        assert r2.source == "redis" and r2.serialized == r1.serialized
        assert (second.cache.redis_hits, second.cache.misses) == (1, 0)
        assert second.compile(spec).source == "memory"
    finally:
        second.close()


def test_redis_down_is_a_bypass(info):
    with socket.socket() as s:                       # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    c = GrammarCompiler(info, cache=GrammarCache(dead, redis_timeout_s=0.1))
    try:
        assert c.compile(unique_spec("bypass")).source == "compiled"
        assert c.cache.redis_errors >= 1
    finally:
        c.close()


async def test_service_object_compile_validate_and_errors(tiny_model_dir, redis_url, info):
    svc = GrammarService(model_dirs=[tiny_model_dir], redis_url=redis_url)
    try:
        fp = fingerprint(info)
        assert svc.tokenizer_fingerprints() == [fp]
        text = await svc.compile(unique_spec("svc").to_dict(), fp)
        assert text.startswith("{")
        bad = await svc.compile_result({"kind": "gbnf", "text": 'root ::= "a"\nfoo ::= ( "b"\n'}, fp)
        assert not bad["ok"] and bad["error"]["line"] == 3 and ".cc" not in bad["error"]["message"]
        unknown = await svc.compile_result({"kind": "regex", "text": "a"}, "0" * 32)
        assert unknown["error"]["type"] == "UnknownTokenizerError"
        v = await svc.validate({"kind": "builtin", "text": "iso_date"}, "2024-02-30")
        assert v == {"ok": False, "offset": 8, "line": 1, "column": 9,
                     "message": "unexpected '3' at offset 8 (line 1, column 9): not allowed here"}
        assert b"inference_grammar_compile_seconds" in svc.metrics_text()
    finally:
        svc.shutdown()


@pytest.fixture(scope="module")
def serve_app(redis_url):
    import ray
    from ray import serve

    from services.run import init_ray
    init_ray(num_cpus=2, log_to_driver=False)   # Serve in the stack's mode; retries a slow raylet start
    yield serve
    serve.shutdown()
    ray.shutdown()


def test_deployment_through_the_client(serve_app, tiny_model_dir, redis_url):
    serve = serve_app
    # No model dir given: the client registers its tokenizer on first use.
    handle = serve.run(grammar_deployment().bind(redis_url=redis_url), name="grammar", route_prefix=None)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    client = GrammarClient(handle, tokenizer, timeout_s=30.0)

    async def scenario():
        spec = unique_spec("serve")
        h = await client.build(spec)
        m = h.new_matcher()
        assert m._m.accept_string('{"city": "Oslo"}') and m.is_completed()
        assert (await client.build({"kind": "json_schema", "spec": spec.schema})) is not None
        with pytest.raises(GrammarError) as e:
            await client.build({"kind": "grammar", "spec": 'root ::= "a" missing'})
        assert (e.value.line, e.value.column) == (1, 14) and e.value.param == "grammar"
        with pytest.raises(GrammarError, match="has no base case"):
            await client.build({"kind": "json_schema", "spec": {
                "$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}},
                                                     "required": ["next"]}}}})
        return spec

    spec = asyncio.run(scenario())
    stats = handle.stats.remote().result()
    assert client.fingerprint in stats["tokenizers"] and stats["misses"] >= 1

    # A restarted service (new replica, empty memory) serves the same compilation from Redis.
    serve.delete("grammar")
    handle = serve.run(grammar_deployment().bind(model_dirs=[tiny_model_dir], redis_url=redis_url),
                       name="grammar", route_prefix=None)
    result = handle.compile_result.remote(spec.to_dict(), client.fingerprint).result()
    assert result["ok"] and result["source"] == "redis"

    # The service gone: constrained requests get a quick, retryable error.
    serve.delete("grammar")
    gone = GrammarClient(handle, tokenizer, timeout_s=2.0)
    with pytest.raises(GrammarServiceUnavailable):
        asyncio.run(gone.build(unique_spec("gone")))
