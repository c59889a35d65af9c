"""What the gateway and Ray Serve add to time-to-first-token, over the engine alone, in one run.

Three measurements, side by side:
  1. engine alone: AsyncEngine in this process, `generate()` call → first output with a token;
     interleaved with the same engine behind the Gateway's code in this process (no Ray), which
     is what our own code (auth, parsing, tokenizing, formatting) adds;
  2. the stack (LocalStack: Ray, Serve proxies, Gateway, LLMServer with the same engine config),
     per request over gRPC streaming and over REST SSE through Serve's ingress, and over gRPC on
     the gateway replica's own port (INFER_DIRECT_GRPC_PORT): client send → first token message.
     Each stack request also reports the engine's own arrival → first-token time (timing.queue_s +
     timing.prefill_s), so the overhead is paired per request: client TTFT − engine TTFT.
     Three stacks run at once, each in a process (and a Ray) of its own: one with Ray Serve's
     defaults ("ray_defaults"), one with the settings `make run` and the chart use (services/run.py
     SERVE_ENV; the top-level figures), and one of those with INFER_GATEWAY_MODE=colocated (gateway
     and engine in one replica, "colocated"). Requests alternate between them, so other load on
     the machine hits all alike and their differences hold even when the absolute figures drift.
Requests are sequential (one at a time) with the same short prompt, so queueing does not blur
the overhead. Prints one JSON document (medians and p90 in milliseconds).

    python -m loadtest.bench_gateway                  # tiny bundled model on the CPU, 40 requests each
    python -m loadtest.bench_gateway --requests 100 --model models/tiny-target --out results.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The quick brown fox jumps over the lazy dog."
MODES = ("ray_defaults", "stack", "colocated")
STREAMS = ("grpc", "rest", "grpc_direct")   # gRPC through Serve, REST, gRPC on the gateway replica's own port


def _q(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
    return {"median_ms": round(statistics.median(xs) * 1e3, 3), "p90_ms": round(p90 * 1e3, 3), "n": len(xs)}


class _Ctx:
    """The parts of Serve's gRPC context the gateway reads (for the in-process measurement)."""

    def __init__(self, md: list[tuple[str, str]]) -> None:
        self._md, self._code = md, None

    def invocation_metadata(self):
        return self._md

    def set_code(self, code) -> None:
        self._code = code

    def code(self):
        return self._code

    def set_details(self, details) -> None:
        self.details = details

    def set_trailing_metadata(self, md) -> None:
        self.trailing = md


def engine_alone(engine_args: dict[str, Any], n: int, max_tokens: int) -> dict[str, list[float]]:
    from services.engine.async_engine import AsyncEngine
    from services.engine.config import EngineConfig
    from services.engine.sampling_params import SamplingParams

    import torch
    torch.set_num_threads(1)   # what a Ray replica with num_cpus=0 gets (OMP_NUM_THREADS=1): same footing
    engine = AsyncEngine(EngineConfig(**engine_args))
    ids = engine.tokenizer.encode(PROMPT)

    internal: list[float] = []   # the engine's own arrival → first token, as the stack reports it

    # Every stream is read to its end, as the stack's clients do: the next request then finds the engine
    # idle, not finishing a step for one abandoned after its first token.
    async def one() -> float:
        t0 = time.perf_counter()
        t = None
        async for out in engine.generate(ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                                         uuid.uuid4().hex):
            if t is None and out.outputs[0].token_ids:
                t = time.perf_counter() - t0
                internal.append(out.metrics.first_token_time - out.metrics.arrival_time)
        return t

    # The gateway's own code (auth, parsing, tokenizing, formatting) in this process, no Ray: the
    # same engine behind an in-process LLMServer, called like Serve's gRPC proxy would.
    from services.config import StackConfig
    from services.gateway.gateway import Gateway
    from services.gateway.service import LocalLLMClient
    from services.gen.inference.v1 import inference_pb2 as pb
    from services.serving.llm_server import LLMServer

    cfg = StackConfig.from_args({"model": engine_args["model"], "auth_disabled": True,
                                 **{f"engine_{k}": v for k, v in engine_args.items()}})
    server = LLMServer(cfg, engine_cls=lambda _config: engine)
    gateway = Gateway(cfg, LocalLLMClient(server))
    req = pb.GenerateRequest(model=cfg.model_name, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                             ignore_eos=True)

    async def via_gateway() -> float:
        t0 = time.perf_counter()
        t = None
        async for msg in gateway.GenerateStream(req, _Ctx([])):
            if t is None and any(c.token_ids for c in msg.choices):
                t = time.perf_counter() - t0
        if t is None:
            raise RuntimeError("no token came back")
        return t

    async def run() -> dict[str, list[float]]:
        for _ in range(3):
            await one()   # warm-up
            await via_gateway()
        alone, gw = [], []
        for _ in range(n):   # interleaved, so machine load drifts over both alike
            alone.append(await one())
            gw.append(await via_gateway())
        return {"alone": alone, "gateway_in_process": gw, "internal": internal[-n:]}

    try:
        return asyncio.run(run())
    finally:
        server.shutdown()


def _probes(grpc_target: str, http_url: str, direct_target: str, model_name: str, key: str,
            max_tokens: int) -> dict[str, Any]:
    """name -> a call to one stack: the stream calls return (client TTFT, engine TTFT), the hops a time."""
    import grpc
    import httpx

    from services.gen.inference.v1 import inference_pb2 as pb
    from services.gen.inference.v1 import inference_pb2_grpc as pbg

    # A streaming call read on the calling thread, not handed over from grpc's channel thread (an
    # option of grpc's Python client, README: gRPC clients): the client's own share of TTFT is not
    # what the stack adds. Every path gets the same client.
    opts = [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
    stub = pbg.InferenceStub(grpc.insecure_channel(grpc_target, options=opts))
    direct = pbg.InferenceStub(grpc.insecure_channel(direct_target, options=opts))
    md = [("authorization", f"Bearer {key}")]
    req = pb.GenerateRequest(model=model_name, prompt=PROMPT, max_tokens=max_tokens, temperature=0, ignore_eos=True)

    def grpc_one(stub=stub) -> tuple[float, float]:
        t0 = time.perf_counter()
        ttft = None
        for msg in stub.GenerateStream(req, metadata=md):
            if ttft is None and any(c.token_ids for c in msg.choices):
                ttft = time.perf_counter() - t0
            last = msg
        return ttft, last.timing.queue_s + last.timing.prefill_s

    http = httpx.Client(base_url=http_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    body = {"model": model_name, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}

    def rest_one() -> tuple[float, float]:
        t0 = time.perf_counter()
        ttft = None
        final = None
        with http.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if ttft is None and any(c.get("text") for c in chunk["choices"]):
                    ttft = time.perf_counter() - t0
                if chunk.get("timing"):
                    final = chunk["timing"]
        return ttft, final["queue_s"] + final["prefill_s"]

    def timed(fn):
        def call() -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return call

    # Ray Serve's own cost per hop, with no engine work: proxy → gateway (ListModels, /health) and
    # proxy → gateway → LLM replica (/ready); the gateway replica's own gRPC port (ListModels).
    return {"grpc_proxy_gateway": timed(lambda: stub.ListModels(pb.ListModelsRequest(), metadata=md)),
            "rest_proxy_gateway": timed(lambda: http.get("/health")),
            "rest_proxy_gateway_replica": timed(lambda: http.get("/ready")),
            "grpc_direct_gateway": timed(lambda: direct.ListModels(pb.ListModelsRequest(), metadata=md)),
            "grpc": grpc_one, "rest": rest_one, "grpc_direct": lambda: grpc_one(direct)}


def through_stacks(targets: dict[str, tuple[str, str, str]], model_name: str, key: str, n: int,
                   max_tokens: int) -> dict[str, dict[str, Any]]:
    """Per stack (name -> (grpc target, http url, direct gRPC target)): hop times and (client, engine)
    TTFTs. Requests alternate between the stacks in a random order, so load from elsewhere hits them
    alike."""
    probes = {name: _probes(*t, model_name, key, max_tokens) for name, t in targets.items()}
    out: dict[str, dict[str, Any]] = {name: {"hops": {}} for name in targets}
    rng = random.Random(0)
    for kind in next(iter(probes.values())):
        for name in targets:
            for _ in range(3):
                probes[name][kind]()   # warm-up
        results: dict[str, list] = {name: [] for name in targets}
        for _ in range(n):
            for name in rng.sample(list(targets), len(targets)):
                results[name].append(probes[name][kind]())
        for name, xs in results.items():
            if kind in STREAMS:
                client, engine = zip(*xs)
                out[name][kind] = {"client": list(client), "engine": list(engine)}
            else:
                out[name]["hops"][kind] = xs
    return out


def serve_child(mode: str, config_args: str) -> int:
    """`--serve-child MODE`: one stack in this process until stdin closes (the parent's signal)."""
    from services.config import StackConfig
    from services.run import SERVE_ENV, LocalStack

    ready = os.fdopen(os.dup(1), "w")   # the parent reads only this; everything else goes to stderr
    os.dup2(2, 1)
    args = json.loads(config_args)
    if mode == "colocated":
        args["gateway_mode"] = "colocated"
    stack = LocalStack(StackConfig.from_args(args), num_cpus=max(2, os.cpu_count() or 2),
                       log_to_driver=False, serve_env={} if mode == "ray_defaults" else SERVE_ENV).start()
    try:
        print("ready", file=ready, flush=True)
        sys.stdin.read()
    finally:
        stack.stop()
    return 0


def run(model: str, requests: int = 40, max_tokens: int = 4) -> dict[str, Any]:
    from services.config import StackConfig
    from services.run import SERVE_ENV, free_port

    engine_args = {"model": model, "max_model_len": 512, "num_kv_blocks": 128, "max_num_seqs": 8}
    local = engine_alone(engine_args, requests, max_tokens)
    alone = local["alone"]

    keys = Path(tempfile.mkdtemp()) / "keys.json"
    key = "sk-bench"
    keys.write_text(json.dumps({"keys": [{"key": key, "tenant": "bench"}]}))
    # Every mode at once, each stack in a process (and Ray) of its own, started one by one.
    children: dict[str, subprocess.Popen] = {}
    targets: dict[str, tuple[str, str, str]] = {}
    try:
        for mode in MODES:
            http_port, grpc_port, direct_port = free_port(), free_port(), free_port()
            args = {"model": model, "http_port": http_port, "grpc_port": grpc_port, "host": "127.0.0.1",
                    "direct_grpc_port": direct_port,
                    "api_keys_file": str(keys), **{f"engine_{k}": v for k, v in engine_args.items()}}
            child = children[mode] = subprocess.Popen(
                [sys.executable, "-m", "loadtest.bench_gateway", "--serve-child", mode, "--child-config",
                 json.dumps(args)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env={**os.environ,
                     "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
            for line in child.stdout:
                if line.strip() == "ready":
                    break
            else:
                raise RuntimeError(f"the {mode} stack did not start (exit {child.wait()})")
            targets[mode] = (f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", f"127.0.0.1:{direct_port}")
        via_by_env = through_stacks(targets, StackConfig.from_args(args).model_name, key, requests, max_tokens)
    finally:
        for child in children.values():
            child.stdin.close()
        for child in children.values():
            try:
                child.wait(timeout=120)
            except subprocess.TimeoutExpired:
                child.kill()
    result: dict[str, Any] = {
        "benchmark": "gateway_ttft_overhead", "model": model, "requests": requests, "max_tokens": max_tokens,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "serve_env": SERVE_ENV,
        "engine_alone_ttft": _q(alone),
        # What the paired figures below subtract: the engine's own stamps miss the loop's pickup
        # and the hand-back to asyncio, which engine-alone TTFT includes.
        "engine_alone_internal_ttft": _q(local["internal"]),
        "gateway_in_process_ttft": _q(local["gateway_in_process"]),
        "gateway_code_added_median_ms": round((statistics.median(local["gateway_in_process"])
                                               - statistics.median(alone)) * 1e3, 3),
    }
    pickup = statistics.median(alone) - statistics.median(local["internal"])

    def stack_figures(via: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"serve_round_trip_no_engine": {k: _q(v) for k, v in via.pop("hops").items()}}
        for name, d in via.items():
            paired = [c - e for c, e in zip(d["client"], d["engine"])]
            out[name] = {"client_ttft": _q(d["client"]), "engine_ttft_in_stack": _q(d["engine"]),
                         "added_ttft_paired": _q(paired),
                         "added_ttft_paired_net_of_engine_pickup_median_ms": round(
                             (statistics.median(paired) - pickup) * 1e3, 3),
                         "added_ttft_vs_engine_alone_median_ms": round(
                             (statistics.median(d["client"]) - statistics.median(alone)) * 1e3, 3)}
        return out

    result.update(stack_figures(via_by_env["stack"]))
    for mode in ("ray_defaults", "colocated"):
        result[mode] = stack_figures(via_by_env[mode])
        result[f"stack_minus_{mode}_added_ttft_median_ms"] = {
            name: round(result[name]["added_ttft_paired"]["median_ms"]
                        - result[mode][name]["added_ttft_paired"]["median_ms"], 3) for name in STREAMS}
    return result


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    """Bars: median TTFT added, net of the engine's pickup, per stack and path; a dot per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loadtest.plots import _save

    modes = {"ray_defaults": "Ray defaults", "stack": "separate", "colocated": "colocated"}
    paths = {"grpc": "gRPC (Serve)", "rest": "REST (Serve)", "grpc_direct": "gRPC (own port)"}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(paths)
    for j, (kind, label) in enumerate(paths.items()):
        xs = [i + (j - 1) * width for i in range(len(modes))]
        runs = [[(r if m == "stack" else r[m])[kind]["added_ttft_paired_net_of_engine_pickup_median_ms"]
                 for r in results] for m in modes]
        ax.bar(xs, [statistics.median(v) for v in runs], width, label=label)
        for x, v in zip(xs, runs):
            ax.plot([x] * len(v), v, "k.", markersize=4)
    ax.axhline(2.0, color="red", linestyle="--", linewidth=1, label="goal: 2 ms")
    ax.set_xticks(range(len(modes)), list(modes.values()))
    ax.set_ylabel("TTFT added over the engine alone, median ms")
    cpus = results[0]["machine"]["cpus"]
    ax.set_title(f"Gateway + Ray Serve overhead ({cpus} CPUs, {len(results)} run(s) of {results[0]['requests']})")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks([1, 2, 5, 10, 20, 50])
    ax.legend(fontsize=8)
    _save(fig, path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "tiny-target"))
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--out", help="also write the JSON here, and a PNG beside it")
    ap.add_argument("--plot", nargs="+", metavar="JSON", help="only draw the PNG (--out) from earlier runs' JSON")
    ap.add_argument("--serve-child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--child-config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.serve_child:
        return serve_child(args.serve_child, args.child_config)
    if args.plot:
        print(plot([json.loads(Path(p).read_text()) for p in args.plot], Path(args.out)))
        return 0
    result = run(args.model, args.requests, args.max_tokens)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        plot([result], Path(args.out).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
