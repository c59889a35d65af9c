"""Colocated replicas autoscale on calls to their own gRPC port, which Serve never routes: real Ray
and Serve (in a process of their own, beside the session's stack), three streams held open on the
direct port, target 1 ongoing request a replica, upscale delay cut to 1 s, 20 s to decide. With the policy of
services.app a second replica starts; with Serve's default policy (the control) none does."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = r'''
import json, os, sys, threading, time
import grpc
import services.app as app
from ray import serve
from services.config import StackConfig
from services.gen.inference.v1 import inference_pb2 as pb, inference_pb2_grpc as pbg
from services.run import LocalStack, free_port

options = app.llm_deployment_options
def quick(cfg):
    o = options(cfg)
    if sys.argv[2] == "serve-default":
        o["autoscaling_config"].pop("policy")
    o["autoscaling_config"].update(upscale_delay_s=1, downscale_delay_s=600, metrics_interval_s=0.5,
                                   look_back_period_s=2)
    return o
app.llm_deployment_options = quick
port = free_port()
cfg = StackConfig.from_args({"model": sys.argv[1], "host": "127.0.0.1", "http_port": free_port(),
    "grpc_port": free_port(), "auth_disabled": True, "gateway_mode": "colocated", "direct_grpc_port": port,
    "grammar_replicas": 0, "llm_min_replicas": 1, "llm_max_replicas": 2, "llm_target_ongoing_requests": 1,
    "engine_max_model_len": 512, "engine_num_kv_blocks": 128})
stack = LocalStack(cfg, num_cpus=2, log_to_driver=False).start()
try:
    stub = pbg.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    stop, done = time.monotonic() + 20, threading.Event()   # a decision comes within ~5 s
    def load():
        while not done.is_set():
            for _ in stub.GenerateStream(pb.GenerateRequest(model="tiny", prompt="x", max_tokens=400, ignore_eos=True)):
                pass
    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    seen = 1
    while time.monotonic() < stop and seen < 2:
        time.sleep(1)
        states = serve.status().applications["inference"].deployments["Gateway"].replica_states
        seen = max(seen, sum(states.values()))   # STARTING counts: the decision is made
    done.set()
    for t in threads:
        t.join()
    print(json.dumps({"replicas": seen}), flush=True)
finally:
    stack.stop()
'''


@pytest.mark.parametrize("policy, replicas", [("ours", 2), ("serve-default", 1)])
def test_direct_calls_scale_colocated_replicas(tiny_model_dir, policy, replicas):
    out = subprocess.run([sys.executable, "-c", CHILD, tiny_model_dir, policy], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO, "RAY_AUTH_MODE": "disabled"})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert lines, out.stderr[-3000:]
    assert json.loads(lines[-1])["replicas"] == replicas
