"""One error type for both surfaces: OpenAI's JSON shape for REST, a status code for gRPC.

`APIError` carries the HTTP status; the gRPC code is derived from it, so a rule is written once.
"""
from __future__ import annotations

import math
import grpc

from services.serving.wire import ErrorInfo

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error",
          499: "cancelled", 500: "internal_error", 503: "service_unavailable"}

_GRPC = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
         413: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
         499: grpc.StatusCode.CANCELLED, 500: grpc.StatusCode.INTERNAL,
         503: grpc.StatusCode.UNAVAILABLE}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "internal_error")

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return _GRPC.get(self.status, grpc.StatusCode.INVALID_ARGUMENT if self.status < 500
                         else grpc.StatusCode.INTERNAL)

    @property
    def retry_after_header(self) -> str | None:
        """Whole seconds, at least 1 (Retry-After has no fractions)."""
        return None if self.retry_after is None else str(max(1, math.ceil(self.retry_after)))

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        h = self.retry_after_header
        return {"Retry-After": h} if h else {}

    def to_wire(self) -> ErrorInfo:
        return ErrorInfo(self.status, self.message, self.param, self.code, self.retry_after)

    @classmethod
    def from_wire(cls, e: ErrorInfo) -> "APIError":
        return cls(e.status, e.message, e.param, e.code, e.retry_after)


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None)
