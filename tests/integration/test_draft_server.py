"""The DraftServer on real Ray Serve: remote speculation gives the same greedy outputs as plain
decoding, sequences stay on their replica (no state lost across 2 replicas), also from inside an
LLMServer replica where Serve routes handles on the replica's own event loop (services/run.py
SERVE_ENV), and stopping the service in the middle of a load fails no request (plain decoding
meanwhile), then speculation resumes when the service is back."""
from __future__ import annotations

import asyncio
import threading

import pytest

from services.draft.remote import RemoteDraftProposer
from services.draft.server import build_draft_app
from services.engine.async_engine import AsyncEngine
from services.engine.config import EngineConfig
from services.engine.llm import LLM
from services.engine.llm_engine import LLMEngine
from services.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.integration

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n\nclass Config:\n    def __init__(self", "x = ",
           "    def __repr__(self):\n        return", "for i in range(10):", "class Foo(object):\n"]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
APP = "draft-test"



@pytest.fixture(scope="module")
def serve_draft(tiny_draft_dir):
    import ray
    from ray import serve

    from services.run import init_ray
    owns_ray = not ray.is_initialized()
    init_ray(num_cpus=2, log_to_driver=False)

    def deploy(num_replicas: int):
        serve.run(build_draft_app(tiny_draft_dir, num_replicas=num_replicas, device="cpu", num_kv_blocks=256),
                  name=APP, route_prefix=None)
        return serve.get_deployment_handle("DraftServer", app_name=APP)

    handle = deploy(2)
    yield lambda num_replicas=None: deploy(num_replicas) if num_replicas else handle
    serve.delete(APP)
    if owns_ray:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    llm = LLM(tiny_model_dir, num_kv_blocks=256)
    return {p: list(o.outputs[0].token_ids) for p, o in zip(PROMPTS, llm.generate(PROMPTS, GREEDY))}


def spec_config(model: str) -> EngineConfig:
    return EngineConfig(model=model, num_kv_blocks=256, speculative_method="remote", speculative_adaptive=False)


def test_remote_greedy_identical_and_sticky(serve_draft, tiny_model_dir, reference):
    handle = serve_draft()
    # A generous deadline: this checks outputs and routing, not speed, on a busy 2-core machine.
    proposer = RemoteDraftProposer(handle, timeout_s=30.0, num_shards=8)
    engine = LLMEngine(spec_config(tiny_model_dir), {"remote": proposer})
    llm = LLM.__new__(LLM)
    llm.engine, llm._ids = engine, iter(map(str, range(10**6)))
    outs = llm.generate(PROMPTS, GREEDY)
    assert {p: list(o.outputs[0].token_ids) for p, o in zip(PROMPTS, outs)} == reference
    stats = engine.speculator.stats
    assert stats.num_fallbacks == 0 and stats.acceptance_rate > 0.2
    assert proposer.tracker.num_lost == 0     # every sequence came back to the replica that holds it


def test_remote_speculation_inside_an_llm_replica(serve_draft, tiny_model_dir, reference):
    """The production wiring: LLMServer builds the proposer on its replica's loop, the engine
    thread hands each step's calls to that loop; greedy outputs stay exact and guesses come back."""
    from ray import serve
    from transformers import AutoTokenizer

    from services.config import StackConfig
    from services.serving.llm_server import LLMServer
    from services.serving.wire import ReplicaRequest

    cfg = StackConfig.from_args({"model": tiny_model_dir, "auth_disabled": True, "engine_num_kv_blocks": 256,
                                 "engine_speculative_method": "remote", "engine_speculative_adaptive": False})
    llm = serve.run(serve.deployment(LLMServer, name="LLMServer", ray_actor_options={"num_cpus": 0}).bind(
        cfg, draft_handle=serve_draft()), name="draft-llm-test", route_prefix=None)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    try:
        for i, prompt in enumerate(PROMPTS[:3]):
            req = ReplicaRequest(f"llm-{i}", tokenizer.encode(prompt),
                                 {"temperature": 0.0, "max_tokens": 40, "ignore_eos": True})
            tokens = []
            for chunk in llm.options(stream=True).generate.remote(req):
                assert chunk.error is None
                tokens += chunk.choices[0].token_ids
            assert tokens == reference[prompt]
        text = llm.metrics_text.remote().result().decode()
    finally:
        serve.delete("draft-llm-test")
    proposed = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("inference_spec_proposed_tokens_total{")]
    assert proposed and proposed[0] > 0     # draft replies reached the engine thread


async def test_stopping_the_draft_server_mid_load_fails_nothing(serve_draft, tiny_model_dir, reference):
    from ray import serve
    handle = serve_draft()
    proposer = RemoteDraftProposer(handle, timeout_s=1.0, num_shards=4, cooldown_s=0.1, max_cooldown_s=2.0)
    engine = AsyncEngine(spec_config(tiny_model_dir), engine=LLMEngine(spec_config(tiny_model_dir),
                                                                     {"remote": proposer}))
    stats = engine.engine.speculator.stats
    stopped = threading.Event()

    async def one(i: int, prompt: str) -> list[int]:
        last = None
        async for out in engine.generate(engine.tokenizer.encode(prompt), GREEDY, request_id=f"r{i}"):
            last = out
            if stats.num_accepted_tokens > 0 and not stopped.is_set():
                stopped.set()   # first accepted guesses seen: take the service away under load
                await asyncio.to_thread(serve.delete, APP)
        return list(last.outputs[0].token_ids)

    try:
        results = await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))
        assert dict(zip(PROMPTS, results)) == reference   # nothing failed, nothing changed
        assert stopped.is_set() and stats.num_fallbacks > 0
        # The service comes back: speculation resumes on new requests.
        serve_draft(num_replicas=1)
        accepted = stats.num_accepted_tokens
        results = await asyncio.gather(*(one(100 + i, p) for i, p in enumerate(PROMPTS[:3])))
        assert dict(zip(PROMPTS[:3], results)) == {p: reference[p] for p in PROMPTS[:3]}
        assert stats.num_accepted_tokens > accepted
    finally:
        engine.shutdown()
