"""INFER_GATEWAY_MODE=colocated: every LLM replica is also the gateway (one Serve deployment behind
HAProxy, no handle hop). The stack runs as `make run` runs it (`python -m services.run`, in a
process of its own beside the session's other stack), against the session's real Redis.

Checks: REST (the `openai` client) and gRPC answer, greedy outputs equal the offline API's, unary
equals streamed; the replica's /metrics carries the engine's own gauges (it is the LLM replica);
a stream cut off by the client aborts in the engine (running requests back to 0); the replica's own
gRPC port (INFER_DIRECT_GRPC_PORT) answers alike; SIGTERM stops the stack after a stream in flight on
that port has finished.
"""
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import httpx
import pytest
from openai import OpenAI

from services.engine.sampling_params import SamplingParams
from services.gen.inference.v1 import inference_pb2 as pb
from services.gen.inference.v1 import inference_pb2_grpc as pbg
from services.run import free_port

pytestmark = pytest.mark.integration
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "def add(a, b):\n"


@pytest.fixture(scope="module")
def colocated(tiny_model_dir, redis_url):
    http, grpc_port, direct = free_port(), free_port(), free_port()
    env = {**os.environ, "INFER_MODEL": tiny_model_dir, "INFER_HOST": "127.0.0.1", "INFER_HTTP_PORT": str(http),
           "INFER_GRPC_PORT": str(grpc_port), "INFER_REDIS_URL": redis_url, "INFER_AUTH_DISABLED": "true",
           "INFER_GATEWAY_MODE": "colocated", "INFER_DIRECT_GRPC_PORT": str(direct),
           "INFER_LLM_MIN_REPLICAS": "1", "INFER_LLM_MAX_REPLICAS": "2",   # autoscaled: the policy of services.app
           "INFER_GRAMMAR_REPLICAS": "0", "INFER_ENGINE_MAX_MODEL_LEN": "512",
           "INFER_ENGINE_NUM_KV_BLOCKS": "128", "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-m", "services.run"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "inference stack is up" in line:
            break
    else:
        pytest.fail("the colocated stack did not start:\n" + "".join(lines[-40:]))
    yield f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc_port}", f"127.0.0.1:{direct}", proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0


def metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics", timeout=30).text
    m = re.search(rf"^{name}(?:_total)?\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def test_rest_and_grpc_answer_like_the_offline_api(colocated, tiny_model_dir):
    base, target, direct, _ = colocated
    from services.engine.llm import LLM
    want = LLM(tiny_model_dir, max_model_len=512).generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    oai = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
    assert oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text == want
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == want
    stub = pbg.InferenceStub(grpc.insecure_channel(target))
    text = "".join(m.choices[0].text for m in stub.GenerateStream(
        pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)) if m.choices)
    assert text == want
    direct_stub = pbg.InferenceStub(grpc.insecure_channel(direct))
    assert direct_stub.Generate(pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=12,
                                                   temperature=0)).choices[0].text == want
    assert metric(base, "inference_generation_tokens") >= 48     # the engine's gauges: this is the replica


def test_a_cut_stream_aborts_in_the_engine(colocated):
    base = colocated[0]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break                                            # first token seen: hang up
    deadline = time.monotonic() + 10
    while metric(base, "inference_running_requests") > 0:
        assert time.monotonic() < deadline, "the engine still runs the abandoned request"
        time.sleep(0.2)


def test_sigterm_lets_a_direct_stream_finish(colocated):
    _, _, direct, proc = colocated
    stub = pbg.InferenceStub(grpc.insecure_channel(direct))
    stream = stub.GenerateStream(pb.GenerateRequest(model="tiny", prompt=PROMPT, max_tokens=500, ignore_eos=True))
    first = next(stream)
    proc.send_signal(signal.SIGTERM)    # Serve drains, then the replica's own port lets this call end
    rest = list(stream)
    assert sum(len(c.token_ids) for m in [first, *rest] for c in m.choices) == 500
    assert rest[-1].choices[0].finish_reason == "length"
    assert proc.wait(timeout=120) == 0
