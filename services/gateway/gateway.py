"""The gateway: ONE Ray Serve ingress deployment that is both the OpenAI REST app (FastAPI) and the
inference.v1.Inference + grpc.health.v1.Health servicer (Serve's gRPC proxy calls the methods named
like the RPCs). `services.app` wraps it with `serve.ingress(app)` and `serve.deployment`; tests
may construct it directly with a `LocalLLMClient`.

With INFER_DIRECT_GRPC_PORT set, each replica also serves the gRPC methods on a port of its own
(`services.gateway.direct`).

Open routes: /health (liveness), /ready (a replica answers and its engine is healthy), /metrics.
Everything under /v1 needs an API key. Each request opens a `gateway.*` span (child of the
caller's W3C context) whose context travels to the replica inside the ReplicaRequest.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.config import StackConfig
from services.gateway import grpc_api, rest
from services.gateway.auth import Authenticator
from services.gateway.direct import DirectGrpc
from services.gateway.errors import APIError
from services.gateway.health import HealthMixin
from services.gateway.protocol import parse_chat, parse_completion
from services.gateway.results import Accumulator
from services.gateway.service import GatewayService, LLMClient, LocalLLMClient, RayLLMClient, model_limits
from services.gen.inference.v1 import inference_pb2 as pb
from services.telemetry import metrics, tracing

app = FastAPI(title="inference-stack", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and wrong methods answer in OpenAI's error shape too.
    e = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                 code="not_found" if exc.status_code == 404 else None)
    return rest.error_response(e)


# Routes are plain functions that find the replica's Gateway instance: Serve's class-based views
# do not inject `self` with the FastAPI version pinned here (routes answered 422 "self" missing).
_local: "Gateway | None" = None   # set by tests that run the app without Serve (ASGI in process)


def _gateway() -> "Gateway":
    if _local is not None:
        return _local
    from ray import serve
    return serve.get_replica_context().servable_object


@app.get("/health")
async def health() -> Response:
    return await _gateway().health()


@app.get("/ready")
async def ready() -> Response:
    return await _gateway().ready()


@app.get("/metrics")
async def metrics_route() -> Response:
    return await _gateway().metrics_route()


@app.get("/v1/models")
async def models(request: Request) -> Response:
    return await _gateway().models(request)


@app.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _gateway().completions(request)


@app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _gateway().chat_completions(request)


class Gateway(HealthMixin):
    def __init__(self, config: StackConfig, llm: Any, tokenizer: Any = None) -> None:
        tracing.setup_tracing(config.service_name, config.otel_exporter, config.otel_endpoint)
        # A DeploymentHandle answers any attribute, so test for the local client's type instead.
        client: LLMClient = llm if isinstance(llm, LocalLLMClient) else RayLLMClient(llm)
        if tokenizer is None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(config.engine.tokenizer_path)
        vocab, max_len = model_limits(config.engine.model, config.engine.max_model_len)
        auth = Authenticator.from_file(config.api_keys_file, disabled=config.auth_disabled)
        self.service = GatewayService(config, client, tokenizer, auth, vocab, max_len)
        self.config = config
        self.direct: DirectGrpc | None = None
        if config.direct_grpc_port:   # in a Serve replica: __init__ runs on the replica's event loop
            self.direct = DirectGrpc(self, config.host, config.direct_grpc_port)
            self._direct_start = asyncio.get_running_loop().create_task(self.direct.start())

    async def stop_direct(self, grace_s: float) -> None:
        if self.direct is not None:
            await self.direct.stop(grace_s)

    # ---- REST ---------------------------------------------------------------------------------
    async def health(self) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self) -> Response:
        problem = await self._replica_problem()
        if problem:
            return rest.error_response(APIError(503, f"Not ready: {problem}"))
        return JSONResponse({"status": "ready", "model": self.config.model_name})

    async def metrics_route(self) -> Response:
        body = metrics.gateway_text()
        try:
            body += await self.service.llm.call("metrics_text")
        except Exception as e:   # the gateway's own metrics still count when no replica answers
            body += f"# replica metrics unavailable: {type(e).__name__}\n".encode()
        return Response(body, media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        try:
            self.service.auth.authenticate(request.headers.get("authorization"))
        except APIError as e:
            return rest.error_response(e)
        return JSONResponse({"object": "list", "data": self.service.list_models()})

    async def completions(self, request: Request) -> Response:
        return await self._rest(request, "completions", parse_completion)

    async def chat_completions(self, request: Request) -> Response:
        return await self._rest(request, "chat.completions", parse_chat)

    async def _rest(self, request: Request, method: str, parse) -> Response:
        span = tracing.start_span(f"gateway.{method}", tracing.extract(request.headers), SpanKind.SERVER,
                                  {"rpc.system": "http", "http.route": request.url.path})
        code = 500
        streaming = False
        try:
            tenant = self.service.auth.authenticate(request.headers.get("authorization"))
            span.set_attribute("inference.tenant", tenant.name)
            parsed = parse(await rest.read_json(request, self.config.max_body_bytes))
            prep = self.service.prepare(parsed, tenant)
            span.set_attribute("inference.request_id", prep.request_id)
            carrier = tracing.carrier_of(span)
            resp = await rest.respond(self.service, prep, carrier, rest.deadline_from(request.headers))
            code = resp.status_code
            if isinstance(resp, StreamingResponse):
                resp.body_iterator = self._end_with(resp.body_iterator, span, method)
                streaming = True
            return resp
        except APIError as e:
            code = e.status
            span.set_status(Status(StatusCode.ERROR, e.message))
            if e.status == 429:
                metrics.RATE_LIMITED.labels(getattr(locals().get("tenant"), "name", "unknown")).inc()
            return rest.error_response(e)
        finally:
            if not streaming:
                metrics.REQUESTS.labels("rest", method, str(code)).inc()
                span.end()

    @staticmethod
    async def _end_with(body: AsyncIterator[bytes], span: Any, method: str) -> AsyncIterator[bytes]:
        code = "200"
        try:
            async for part in body:
                yield part
        except BaseException:
            code = "499"    # the client went away (or the stream was cancelled) mid-stream
            span.set_status(Status(StatusCode.ERROR, "stream cancelled"))
            raise
        finally:
            metrics.REQUESTS.labels("rest", method, code).inc()
            span.end()

    # ---- gRPC (inference.v1.Inference) ---------------------------------------------------------
    async def Generate(self, request: Any, grpc_context: Any = None) -> Any:
        out = None
        async for out in self._grpc(request, grpc_context, "Generate", chat=False, stream=False):
            pass
        return out if out is not None else pb.GenerateResponse()

    async def GenerateStream(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        async with aclosing(self._grpc(request, grpc_context, "GenerateStream", chat=False, stream=True)) as outs:
            async for out in outs:
                yield out

    async def Chat(self, request: Any, grpc_context: Any = None) -> Any:
        out = None
        async for out in self._grpc(request, grpc_context, "Chat", chat=True, stream=False):
            pass
        return out if out is not None else pb.ChatResponse()

    async def ChatStream(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        async with aclosing(self._grpc(request, grpc_context, "ChatStream", chat=True, stream=True)) as outs:
            async for out in outs:
                yield out

    async def ListModels(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            self.service.auth.authenticate(grpc_api.metadata_value(grpc_context, "authorization"))
        except APIError as e:
            grpc_api.set_error(grpc_context, e)
            return pb.ListModelsResponse()
        return pb.ListModelsResponse(models=[pb.Model(id=m["id"], owned_by=m["owned_by"], created=m["created"],
                                                      max_model_len=m["max_model_len"])
                                             for m in self.service.list_models()])

    async def _grpc(self, request: Any, ctx: Any, method: str, chat: bool, stream: bool) -> AsyncIterator[Any]:
        carrier_in = {k: v for k, v in ctx.invocation_metadata() if k in ("traceparent", "tracestate")}
        span = tracing.start_span(f"gateway.{method}", tracing.extract(carrier_in), SpanKind.SERVER,
                                  {"rpc.system": "grpc", "rpc.method": method})
        try:
            tenant = self.service.auth.authenticate(grpc_api.metadata_value(ctx, "authorization"))
            span.set_attribute("inference.tenant", tenant.name)
            body = grpc_api.request_dict(request)
            parsed = parse_chat(body) if chat else parse_completion(body)
            prep = self.service.prepare(parsed, tenant)
            span.set_attribute("inference.request_id", prep.request_id)
            carrier = tracing.carrier_of(span)
            deadline_s = grpc_api.metadata_value(ctx, rest.TIMEOUT_HEADER)
            deadline = rest.deadline_from({rest.TIMEOUT_HEADER: deadline_s} if deadline_s else {})
            acc = Accumulator(parsed.n, started=prep.started)
            first = True
            echo = (prep.prompt_text or "") if parsed.echo else ""
            # aclosing: closing this generator (client cancel) must close the replica stream now,
            # not whenever the garbage collector finalises it.
            async with aclosing(self.service.stream(prep, carrier, deadline)) as chunks:
                async for chunk in chunks:
                    acc.add(chunk)
                    if stream:
                        deltas = [d for d in chunk.choices if d.text or d.token_ids or d.finish_reason]
                        final = acc if chunk.finished else None
                        if deltas or final is not None:
                            yield (grpc_api.chat_delta(prep.request_id, parsed.model, prep.created, deltas, first, final)
                                   if chat else grpc_api.completion_delta(prep.request_id, parsed.model, prep.created,
                                                                          deltas, final))
                            first = False
            if not stream:
                yield (grpc_api.chat_reply(prep.request_id, parsed.model, prep.created, acc) if chat
                       else grpc_api.completion_reply(prep.request_id, parsed.model, prep.created, acc, echo))
        except APIError as e:
            span.set_status(Status(StatusCode.ERROR, e.message))
            grpc_api.set_error(ctx, e)
            if stream:
                # Serve forwards a streaming call's context only with a message or an exception
                # raised after set_code; without this the client would see OK and no messages.
                raise grpc_api.StreamError(e.message) from None
        finally:
            metrics.REQUESTS.labels("grpc", method, grpc_api.status_name(ctx)).inc()
            span.end()
