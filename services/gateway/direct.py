"""A gateway replica's own gRPC port (INFER_DIRECT_GRPC_PORT): inference.v1.Inference and
grpc.health.v1 served by the replica itself on grpc.aio, beside Serve's ingress.

Through Serve a call crosses HAProxy and Serve's request wrapping in the replica; here the client's
HTTP/2 stream lands on the replica's event loop and goes straight to the Gateway's methods: the same
auth, validation, tracing, metrics and errors (README, Benchmarks: what each path adds to TTFT).
Clients balance over replicas themselves (a headless Service and gRPC's round_robin in Kubernetes).

Replicas sharing a host take the first free port of [port, port + PORT_SPAN). Serve does not see
these calls; each replica reports how many are in flight, which the autoscaling policy of
`services.app` adds to the requests Serve counts.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from services.gateway.grpc_api import StreamError
from services.gen.inference.v1 import inference_pb2_grpc as pbg

PORT_SPAN = 16
logger = logging.getLogger(__name__)


def _unary(name: str) -> Callable[..., Any]:
    async def handler(self: "_Servicer", request: Any, context: Any) -> Any:
        with self._counted():
            return await getattr(self.g, name)(request, context)
    return handler


def _stream(name: str) -> Callable[..., AsyncIterator[Any]]:
    # An async generator function itself: grpc.aio tells a streaming handler by its function type.
    async def handler(self: "_Servicer", request: Any, context: Any) -> AsyncIterator[Any]:
        with self._counted():
            try:
                async for out in getattr(self.g, name)(request, context):
                    yield out
            except StreamError:
                return
    return handler


class _Servicer(pbg.InferenceServicer, health_pb2_grpc.HealthServicer):
    """The Gateway's RPC methods as grpc.aio handlers, the inference calls counted while in flight
    (Serve's autoscaling: services.app). A refused stream raises StreamError with the status already
    set on the context (what Serve's proxy needs); grpc.aio would replace the details with the
    exception's text, so here the stream just ends and the status set goes out."""

    Generate, Chat = _unary("Generate"), _unary("Chat")
    GenerateStream, ChatStream = _stream("GenerateStream"), _stream("ChatStream")

    def __init__(self, gateway: Any) -> None:
        self.g = gateway
        self.ongoing = 0
        self.ListModels, self.Check, self.Watch = gateway.ListModels, gateway.Check, gateway.Watch

    @contextmanager
    def _counted(self) -> Iterator[None]:
        self.ongoing += 1
        try:
            yield
        finally:
            self.ongoing -= 1


class DirectGrpc:
    """One grpc.aio server for one gateway replica: bound at construction (so a port clash fails
    the replica's start), started and stopped on the replica's event loop."""

    def __init__(self, gateway: Any, host: str, port: int) -> None:
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])   # never share a port
        self.servicer = _Servicer(gateway)
        pbg.add_InferenceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        self.port = 0
        for p in range(port, min(port + PORT_SPAN, 65536)):
            try:
                self.port = self.server.add_insecure_port(f"{host}:{p}")
                break
            except RuntimeError:   # taken (another replica on this host)
                continue
        if not self.port:
            raise RuntimeError(f"INFER_DIRECT_GRPC_PORT: no free port in [{port}, {port + PORT_SPAN}) on {host}")

    @property
    def ongoing(self) -> int:
        return self.servicer.ongoing

    async def start(self) -> None:
        await self.server.start()
        logger.info("direct gRPC on port %d", self.port)

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls at once; calls in flight get `grace_s` to finish, then are cancelled."""
        await self.server.stop(grace_s)
