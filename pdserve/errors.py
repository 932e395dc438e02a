"""One error vocabulary for pdserve's request path.

The logic raises these typed errors; each service edge (router, prefill, decode, kvstore)
maps them once, with :func:`grpc_status` (gRPC status code name) or :func:`http_status`
(HTTP code and OpenAI ``error.type``). ``code`` is OpenAI's ``error.code`` and the ``error.type`` span attribute.

Messages are for the caller: they name the field (``param``) and never echo unbounded input
(quote user values with :func:`quoted`). Calls to workers fail with :class:`WorkerCallError`,
whose :class:`Failure` says what the caller may do next (migrate, retry, give up).
"""

from __future__ import annotations

import enum

QUOTE_LIMIT_CHARS = 64


def quoted(value: object, limit_chars: int = QUOTE_LIMIT_CHARS) -> str:
    """``repr(value)``, cut to ``limit_chars`` (a user's value in an error message)."""
    text = repr(value)
    if len(text) <= limit_chars:
        return text
    return f"{text[: limit_chars - 3]}... ({len(text)} chars)"


class PdserveError(Exception):
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: int = 0):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s


class InvalidRequest(PdserveError):
    code = "invalid_request"


class ModelNotFound(InvalidRequest):
    code = "model_not_found"


class Unauthenticated(PdserveError):
    code = "invalid_api_key"


class NotFound(PdserveError):
    code = "not_found"


class Overloaded(PdserveError):
    """Admission control said no: retry after ``retry_after_s``."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 0, reason_class: str = "") -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.reason_class = reason_class  # a metric label: queue_full | deadline | kv_full


class AlreadyExists(PdserveError):
    """The thing to create exists and is immutable (a KV block)."""

    code = "already_exists"


class Unavailable(PdserveError):
    """The service cannot take the call now (shutting down, no capacity behind it)."""

    code = "unavailable"


class NoWorkers(Unavailable):
    code = "no_workers"


class WorkerFailed(Unavailable):
    """A worker died or misbehaved and the request could not be moved elsewhere."""

    code = "worker_failed"


class DeadlineExceeded(PdserveError):
    code = "deadline_exceeded"


class Cancelled(PdserveError):
    """The request was aborted (its caller went away) before it finished."""

    code = "cancelled"


class DataLoss(PdserveError):
    """Bytes arrived corrupted (a checksum did not match)."""

    code = "data_loss"


class InternalError(PdserveError):
    code = "internal_error"


# The edges: the most specific class listed wins (ModelNotFound maps as InvalidRequest).
_GRPC = {
    InvalidRequest: "INVALID_ARGUMENT",
    Unauthenticated: "UNAUTHENTICATED",
    NotFound: "NOT_FOUND",
    AlreadyExists: "ALREADY_EXISTS",
    Overloaded: "RESOURCE_EXHAUSTED",
    Unavailable: "UNAVAILABLE",
    DeadlineExceeded: "DEADLINE_EXCEEDED",
    Cancelled: "CANCELLED",
    DataLoss: "DATA_LOSS",
    PdserveError: "INTERNAL",
}
_HTTP = {
    InvalidRequest: (400, "invalid_request_error"),
    Unauthenticated: (401, "authentication_error"),
    NotFound: (404, "not_found_error"),
    AlreadyExists: (409, "conflict_error"),
    Overloaded: (429, "rate_limit_error"),
    Cancelled: (499, "cancelled"),  # the client closed the request (nginx's code)
    Unavailable: (503, "service_unavailable"),
    DeadlineExceeded: (504, "timeout"),
    PdserveError: (500, "server_error"),
}


def _lookup(table: dict, exc: PdserveError):
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    raise TypeError(f"not a PdserveError: {type(exc).__name__}")


def grpc_status(exc: PdserveError) -> str:
    """The ``grpc.StatusCode`` name for ``exc``."""
    return _lookup(_GRPC, exc)


def http_status(exc: PdserveError) -> tuple[int, str]:
    """The HTTP status code and OpenAI ``error.type`` for ``exc``."""
    return _lookup(_HTTP, exc)


class Failure(enum.Enum):
    """Why a call to a worker failed, as the caller acts on it."""

    UNAVAILABLE = "unavailable"  # transport: connection lost or refused; the worker is out
    OVERLOADED = "overloaded"  # RESOURCE_EXHAUSTED: busy, not dead
    DEADLINE = "deadline"  # the call's deadline passed
    STALL = "stall"  # the stream went silent past the stall timeout
    INVALID = "invalid"  # the worker refused the request's content: the caller's fault
    ERROR = "error"  # anything else the worker reported (INTERNAL, ...)


class WorkerCallError(PdserveError):
    code = "worker_failed"

    def __init__(self, failure: Failure, message: str) -> None:
        super().__init__(message)
        self.failure = failure
