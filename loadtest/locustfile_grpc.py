"""Locust user for the gRPC API: inference.v1.Inference/ChatStream and GenerateStream.

    python -m loadtest.run --user grpc --scenario mixed               # the usual way (plots, SLOs)
    LOADTEST_GRPC_TARGET=127.0.0.1:9000 locust -f loadtest/locustfile_grpc.py --tags copy_heavy

Stubs come from services/gen (`make proto`). grpc's gevent integration is switched on before any
channel exists: Locust's users are greenlets, and without it every blocking gRPC call stalls the
whole process (FIELD_NOTES: throughput collapses). Metrics mirror the REST user's: "gRPC" per
request (failures there), "TTFT", "ITL", "TOKENS/S" and "CACHED%" named "grpc <scenario>".
"""
from __future__ import annotations

import itertools
import json
import random
import sys
import time
from pathlib import Path

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, tag

grpc_gevent.init_gevent()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo root
try:
    from services.gen.inference.v1 import inference_pb2 as pb, inference_pb2_grpc as pb_grpc  # noqa: E402
except ImportError as e:
    raise ImportError(f"the gRPC stubs are missing ({e}): run `make proto` first") from None
from loadtest.scenarios import SCENARIOS, Budget, ScenarioRequest, ScenarioSource, Settings, StreamTimer  # noqa: E402
from loadtest.scenarios.outcome import Outcome  # noqa: E402
from loadtest.scenarios.settings import next_user_index  # noqa: E402

SETTINGS = Settings.from_env()
_random_seed = random.randrange(2**31)   # used when LOADTEST_SEED is not set


def to_proto(req: ScenarioRequest, model: str):
    """The scenario's OpenAI-shaped request as a ChatRequest or GenerateRequest (same field names)."""
    fields: dict = {"model": model, "max_tokens": req.max_tokens}
    for name in ("temperature", "priority"):
        if getattr(req, name) is not None:
            fields[name] = getattr(req, name)
    if req.ignore_eos:
        fields["ignore_eos"] = True
    if req.response_format is not None:
        js = req.response_format.get("json_schema")
        fields["response_format"] = pb.ResponseFormat(
            type=req.response_format["type"],
            json_schema=None if js is None else pb.JsonSchema(name=js.get("name", ""), schema=json.dumps(js["schema"]),
                                                              strict=bool(js.get("strict", False))))
    if req.speculative is not None:
        fields["speculative"] = pb.SpeculativeOptions(**req.speculative)
    if req.kind == "chat":
        return pb.ChatRequest(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in req.messages],
                              **fields)
    return pb.GenerateRequest(prompt=req.prompt, **fields)


def _rpc_error(e: grpc.RpcError) -> str:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    return f"{code.name if code else 'UNKNOWN'}: {details}"[:300]


def _scenario_task(scenario: str):
    def run(user: "GrpcUser") -> None:
        user.run_scenario(scenario)
    run.__name__ = scenario
    return tag(scenario)(run)


class GrpcUser(User):
    _key_indexes = itertools.count()
    tasks = {_scenario_task(name): 1 for name in SCENARIOS}

    def wait_time(self) -> float:
        return random.uniform(0, SETTINGS.think_time_s)

    def on_start(self) -> None:
        self.index = next_user_index()
        self.channel = grpc.insecure_channel(SETTINGS.grpc_target)
        self.stub = pb_grpc.InferenceStub(self.channel)
        md = []
        if SETTINGS.grpc_app:
            md.append(("application", SETTINGS.grpc_app))   # Ray Serve's gRPC proxy routes on it
        # Keys by the class's own count, so each protocol spreads over every tenant.
        key = SETTINGS.api_key_for(next(self._key_indexes))
        if key:
            md.append(("authorization", f"Bearer {key}"))
        self.metadata = tuple(md)
        self.model: str | None = None
        self.source: ScenarioSource | None = None
        self.num_discovery_failures = 0

    def on_stop(self) -> None:
        self.channel.close()

    def _fire(self, request_type: str, name: str, value: float, length: int, error: Exception | None) -> None:
        self.environment.events.request.fire(request_type=request_type, name=name, response_time=value,
                                             response_length=length, exception=error, context={})

    def _seed(self) -> int:
        worker_index = getattr(self.environment.runner, "worker_index", 0) or 0   # distributed: one per worker
        return SETTINGS.user_seed(self.index, worker_index, _random_seed)

    def _discover(self) -> bool:
        t0 = time.perf_counter()
        try:
            models = self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata, timeout=30).models
            if not models:
                raise RuntimeError("ListModels returned no model")
            entry = next((m for m in models if m.id == SETTINGS.model), None) if SETTINGS.model else models[0]
            if entry is None:
                raise RuntimeError(f"LOADTEST_MODEL={SETTINGS.model!r} is not served; the server has "
                                   f"{[m.id for m in models]}")
        except Exception as e:   # recorded as a failure, the user retries at its next task
            err = RuntimeError(_rpc_error(e)) if isinstance(e, grpc.RpcError) else e
            self._fire("gRPC", "ListModels", (time.perf_counter() - t0) * 1000, 0, err)
            return False
        self._fire("gRPC", "ListModels", (time.perf_counter() - t0) * 1000, 0, None)
        self.model = entry.id
        max_len = SETTINGS.max_model_len or entry.max_model_len or 2048
        self.source = ScenarioSource(Budget(max_len), self._seed(), SETTINGS.max_tokens,
                                     SETTINGS.ignore_eos)
        return True

    def run_scenario(self, scenario: str) -> None:
        if self.source is None and not self._discover():
            # Back off (greenlet sleep) so a wrong key or URL is not hammered by every user.
            self.num_discovery_failures += 1
            time.sleep(min(10.0, 0.5 * 2 ** self.num_discovery_failures))
            return
        req = self.source.build(scenario)
        out = Outcome("gRPC", req, StreamTimer(time.perf_counter()))
        chat = req.kind == "chat"
        method = self.stub.ChatStream if chat else self.stub.GenerateStream
        try:
            for msg in method(to_proto(req, self.model), metadata=self.metadata, timeout=SETTINGS.timeout_s):
                now = time.perf_counter()
                for choice in msg.choices:
                    out.text += choice.message.content if chat else choice.text
                    out.timer.on_tokens(now, len(choice.token_ids))
                    if choice.finish_reason:
                        out.finish_reason = choice.finish_reason
                if msg.HasField("usage"):
                    out.prompt_tokens, out.completion_tokens = msg.usage.prompt_tokens, msg.usage.completion_tokens
                    out.cached_tokens = msg.usage.cached_tokens
        except grpc.RpcError as e:
            out.fail(_rpc_error(e), time.perf_counter())
        if out.error is None:
            out.finish(time.perf_counter(), self.source.budget)
        else:
            req.record_reply(None)
        for entry in out.entries():
            self._fire(*entry)
