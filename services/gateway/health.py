"""grpc.health.v1.Health on the gateway (Serve's gRPC proxy routes /grpc.health.v1.Health/Check here).

SERVING means: an LLM replica answered within the probe timeout and its engine loop is alive.
Service names: "" (the whole server) and "inference.v1.Inference"; any other name is NOT_FOUND.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

SERVICES = ("", "inference.v1.Inference")
PROBE_TIMEOUT_S = 5.0
WATCH_INTERVAL_S = 2.0


class HealthMixin:
    service: Any   # GatewayService, set by the Gateway

    async def _replica_problem(self) -> str | None:
        """None when a replica answers `ready()` in time, else what went wrong (for the 503 body)."""
        try:
            await asyncio.wait_for(self.service.llm.call("ready"), PROBE_TIMEOUT_S)
        except TimeoutError:
            return f"no LLM replica answered within {PROBE_TIMEOUT_S:g}s"
        except Exception as e:
            return f"LLM replica unhealthy: {type(e).__name__}: {str(e)[:200]}"
        return None

    async def _status(self) -> int:
        problem = await self._replica_problem()
        return health_pb2.HealthCheckResponse.NOT_SERVING if problem else health_pb2.HealthCheckResponse.SERVING

    async def Check(self, request: Any, grpc_context: Any = None) -> Any:
        if request.service not in SERVICES:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}; known: {SERVICES}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=await self._status())

    async def Watch(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        if request.service not in SERVICES:
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return
        last = None
        while True:   # ends when the client cancels (Serve cancels this generator)
            status = await self._status()
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_INTERVAL_S)
