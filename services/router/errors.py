"""Typed router errors: each knows its gRPC status and its OpenAI-style HTTP error.

They are raised by the router's logic and mapped once, at the edge (server.py for gRPC,
openai_api.py for HTTP).
"""

from __future__ import annotations


class RouterError(Exception):
    grpc_code = "INTERNAL"  # a grpc.StatusCode name
    http_status = 500
    error_type = "server_error"  # OpenAI's error.type
    code: str | None = None  # OpenAI's error.code

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: int = 0):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s


class InvalidRequest(RouterError):
    grpc_code = "INVALID_ARGUMENT"
    http_status = 400
    error_type = "invalid_request_error"


class ModelNotFound(InvalidRequest):
    code = "model_not_found"


class Unauthenticated(RouterError):
    grpc_code = "UNAUTHENTICATED"
    http_status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class Overloaded(RouterError):
    """Admission control said no: retry after ``retry_after_s``."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429
    error_type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 0, reason_class: str = "") -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.reason_class = reason_class  # "queue_full" | "deadline" (a metric label)


class NoWorkers(RouterError):
    grpc_code = "UNAVAILABLE"
    http_status = 503
    error_type = "service_unavailable"
    code = "no_workers"


class WorkerFailed(RouterError):
    """A worker died or misbehaved while serving the request."""

    grpc_code = "UNAVAILABLE"
    http_status = 503
    error_type = "service_unavailable"
    code = "worker_failed"


class DeadlineExceeded(RouterError):
    grpc_code = "DEADLINE_EXCEEDED"
    http_status = 504
    error_type = "timeout"
    code = "deadline_exceeded"
