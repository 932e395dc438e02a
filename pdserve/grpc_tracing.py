"""W3C trace context over gRPC: client and server interceptors, for grpc.aio and sync grpc.

Client interceptors open a CLIENT span per call (ended when the call completes, whatever the
outcome) and put its ``traceparent`` into the call's metadata; server interceptors read it
back and run the handler inside a SERVER span whose parent is that client span. Span names
and attributes follow OpenTelemetry's RPC conventions (``pdserve.v1.Prefill/Prefill``,
``rpc.system=grpc``, ``rpc.grpc.status_code``). Health checks and reflection are not traced.

Wiring::

    server = grpc.aio.server(interceptors=[AioServerTracingInterceptor()])
    channel = grpc.aio.insecure_channel(addr, interceptors=aio_client_interceptors())
    server = grpc.server(executor, interceptors=[ServerTracingInterceptor()])          # sync
    channel = grpc.intercept_channel(grpc.insecure_channel(addr), *client_interceptors())

An interceptor never fails a call: tracing errors are swallowed by the OpenTelemetry SDK and a
disabled tracer yields non-recording spans.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from pdserve.telemetry import Attr, get_tracer

_tracer = get_tracer("pdserve.grpc")
UNTRACED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
# Server-side codes that are the server's fault (OpenTelemetry RPC conventions).
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _method_str(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


def _traced(method: str) -> bool:
    return not method.startswith(UNTRACED_PREFIXES)


def _rpc_attributes(method: str) -> tuple[str, dict[str, str]]:
    """``/pkg.Service/Method`` -> span name ``pkg.Service/Method`` and RPC attributes."""
    name = method.lstrip("/")
    service, _, rpc = name.partition("/")
    return name, {Attr.RPC_SYSTEM: "grpc", Attr.RPC_SERVICE: service, Attr.RPC_METHOD: rpc}


def _end(span: trace.Span, code: grpc.StatusCode | None, details: str | None, *, server: bool):
    code = code or grpc.StatusCode.OK
    span.set_attribute(Attr.RPC_STATUS, code.value[0])
    failed = code in _SERVER_ERRORS if server else code is not grpc.StatusCode.OK
    if failed:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details or ''}".rstrip(": ")))
    span.end()


def _metadata_with_context(metadata: Any, span: trace.Span) -> list[tuple[str, str]]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    pairs = [(k, v) for k, v in (metadata or ()) if k not in carrier]
    return pairs + list(carrier.items())


# --- clients -------------------------------------------------------------------------------


class _ClientCallDetails(
    collections.namedtuple(
        "_ClientCallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _SyncClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def _call(self, continuation: Callable, details: grpc.ClientCallDetails, request: Any):
        method = _method_str(details.method)
        if not _traced(method):
            return continuation(details, request)
        name, attributes = _rpc_attributes(method)
        span = _tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
        new_details = _ClientCallDetails(
            details.method, details.timeout, _metadata_with_context(details.metadata, span),
            details.credentials, getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )  # fmt: skip
        try:
            call = continuation(new_details, request)
        except grpc.RpcError as exc:
            _end(span, exc.code(), exc.details(), server=False)
            raise
        call.add_done_callback(lambda c: _end(span, c.code(), c.details(), server=False))
        return call

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return self._call(continuation, client_call_details, request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return self._call(continuation, client_call_details, request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return self._call(continuation, client_call_details, request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return self._call(continuation, client_call_details, request_iterator)


def client_interceptors() -> list[grpc.UnaryUnaryClientInterceptor]:
    """For ``grpc.intercept_channel(channel, *client_interceptors())`` (sync channels)."""
    return [_SyncClientInterceptor()]


_pending: set[asyncio.Task] = set()  # span-ending tasks, referenced until done


async def _end_aio(span: trace.Span, call: grpc.aio.Call) -> None:
    try:
        code, details = await call.code(), await call.details()
    except Exception:  # noqa: BLE001 - a broken call still ends its span
        code, details = grpc.StatusCode.UNKNOWN, None
    _end(span, code, details, server=False)


class _AioClientInterceptor:
    async def _call(self, continuation: Callable, details: grpc.aio.ClientCallDetails, request):
        method = _method_str(details.method)
        if not _traced(method):
            return await continuation(details, request)
        name, attributes = _rpc_attributes(method)
        span = _tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
        metadata = grpc.aio.Metadata(*_metadata_with_context(details.metadata, span))
        new_details = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        try:
            call = await continuation(new_details, request)
        except BaseException as exc:
            code = exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.UNKNOWN
            _end(span, code, str(exc), server=False)
            raise

        def done(c: grpc.aio.Call) -> None:
            task = asyncio.ensure_future(_end_aio(span, c))
            _pending.add(task)
            task.add_done_callback(_pending.discard)

        call.add_done_callback(done)
        return call


class _AioUnaryUnary(_AioClientInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await self._call(continuation, client_call_details, request)


class _AioUnaryStream(_AioClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await self._call(continuation, client_call_details, request)


class _AioStreamUnary(_AioClientInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await self._call(continuation, client_call_details, request_iterator)


class _AioStreamStream(_AioClientInterceptor, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await self._call(continuation, client_call_details, request_iterator)


def aio_client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """For ``grpc.aio.insecure_channel(addr, interceptors=aio_client_interceptors())``.

    grpc.aio takes one interceptor object per call kind, hence four.
    """
    return [_AioUnaryUnary(), _AioUnaryStream(), _AioStreamUnary(), _AioStreamStream()]


# --- servers -------------------------------------------------------------------------------

_HANDLER_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def _start_server_span(details: grpc.HandlerCallDetails) -> tuple[trace.Span, object]:
    """Open the SERVER span under the caller's context and make it current."""
    carrier = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
    name, attributes = _rpc_attributes(_method_str(details.method))
    parent = propagate.extract(carrier)
    span = _tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    return span, token


def _finish_server_span(span, token, context, exc: BaseException | None) -> None:
    code = _context_code(context)
    if exc is not None and code is None:
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            code = grpc.StatusCode.CANCELLED
        else:
            code = grpc.StatusCode.UNKNOWN
            span.record_exception(exc)
    details = _context_details(context) or (repr(exc) if exc is not None else None)
    otel_context.detach(token)  # logs (never raises) if closed from another context
    _end(span, code, details, server=True)


def _context_code(context: Any) -> grpc.StatusCode | None:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpc contexts have no code()
        return None
    return code if isinstance(code, grpc.StatusCode) else None


def _context_details(context: Any) -> str | None:
    try:
        details = context.details()
    except Exception:  # noqa: BLE001
        return None
    return details.decode() if isinstance(details, bytes) else details


def _wrap_handler(handler: grpc.RpcMethodHandler, wrap: Callable) -> grpc.RpcMethodHandler:
    attr, factory = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    return factory(
        wrap(getattr(handler, attr)),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ServerTracingInterceptor(grpc.ServerInterceptor):
    """Sync ``grpc.server(..., interceptors=[ServerTracingInterceptor()])``."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not _traced(_method_str(handler_call_details.method)):
            return handler
        return _wrap_handler(handler, lambda b: _sync_behavior(b, handler, handler_call_details))


def _sync_behavior(behavior: Callable, handler, details) -> Callable:
    if handler.response_streaming:

        def streaming(request_or_iterator, context):
            span, token = _start_server_span(details)
            try:
                yield from behavior(request_or_iterator, context)
            except BaseException as exc:
                _finish_server_span(span, token, context, exc)
                raise
            _finish_server_span(span, token, context, None)

        return streaming

    def unary(request_or_iterator, context):
        span, token = _start_server_span(details)
        try:
            response = behavior(request_or_iterator, context)
        except BaseException as exc:
            _finish_server_span(span, token, context, exc)
            raise
        _finish_server_span(span, token, context, None)
        return response

    return unary


class AioServerTracingInterceptor(grpc.aio.ServerInterceptor):
    """``grpc.aio.server(interceptors=[AioServerTracingInterceptor()])``."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not _traced(_method_str(handler_call_details.method)):
            return handler
        return _wrap_handler(handler, lambda b: _aio_behavior(b, handler, handler_call_details))


def _aio_behavior(behavior: Callable, handler, details) -> Callable:
    if handler.response_streaming:
        # Always an async generator: it relays what the handler yields, and yields nothing
        # for a handler that writes with context.write() and returns a coroutine.
        async def streaming(request_or_iterator, context):
            span, token = _start_server_span(details)
            try:
                result = behavior(request_or_iterator, context)
                if hasattr(result, "__aiter__"):
                    async for response in result:
                        yield response
                elif inspect.isawaitable(result):
                    await result
                elif result is not None:
                    for response in result:
                        yield response
            except BaseException as exc:
                _finish_server_span(span, token, context, exc)
                raise
            _finish_server_span(span, token, context, None)

        return streaming

    async def unary(request_or_iterator, context):
        span, token = _start_server_span(details)
        try:
            response = behavior(request_or_iterator, context)
            if inspect.isawaitable(response):
                response = await response
        except BaseException as exc:
            _finish_server_span(span, token, context, exc)
            raise
        _finish_server_span(span, token, context, None)
        return response

    return unary


def metadata_carrier(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    """The string entries of gRPC metadata, for :func:`pdserve.telemetry.extract_context`."""
    return {k: v for k, v in (metadata or ()) if isinstance(v, str)}
