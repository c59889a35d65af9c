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
from loadtest.scenarios import ScenarioRequest, Settings  # noqa: E402
from loadtest.scenarios.outcome import Outcome  # noqa: E402
from loadtest.scenarios.settings import next_user_index  # noqa: E402
from loadtest.scenarios.user import ScenarioUser, scenario_tasks  # noqa: E402

SETTINGS = Settings.from_env()


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


class GrpcUser(ScenarioUser, User):
    _key_indexes = itertools.count()
    tasks = scenario_tasks(tag)
    protocol, discovery_name, settings = "gRPC", "ListModels", SETTINGS

    def on_start(self) -> None:
        self._start(next_user_index())
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

    def on_stop(self) -> None:
        self.channel.close()

    def _list_models(self) -> list[tuple[str, int | None]]:
        models = self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata, timeout=30).models
        return [(m.id, m.max_model_len or None) for m in models]

    def _discovery_error(self, e: Exception) -> Exception:
        return RuntimeError(_rpc_error(e)) if isinstance(e, grpc.RpcError) else e

    def _stream(self, req: ScenarioRequest, out: Outcome) -> None:
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
