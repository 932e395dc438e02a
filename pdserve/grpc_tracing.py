"""W3C trace context over gRPC, from OpenTelemetry's gRPC instrumentation.

``opentelemetry-instrumentation-grpc`` does the work: client interceptors open a CLIENT span
per call and put its ``traceparent`` into the call's metadata; server interceptors read it
back and run the handler inside a SERVER span whose parent is that client span, with
``rpc.system``, ``rpc.service``, ``rpc.method`` and ``rpc.grpc.status_code``; a status that is
the client's fault (NOT_FOUND, ...) leaves the server span's status unset.

What pdserve adds, because the library lacks it:

- span names as the RPC conventions spell them, ``pdserve.v1.Prefill/Prefill`` (the library
  uses the raw ``/pdserve.v1.Prefill/Prefill`` path);
- health checks and reflection untraced (a filter), plus any methods a server names in
  ``exclude`` (the router's Generate, whose root span is ``router.request``);
- :func:`metadata_carrier` for code that reads the trace context itself.

Wiring::

    server = grpc.aio.server(interceptors=[AioServerTracingInterceptor()])
    channel = grpc.aio.insecure_channel(addr, interceptors=aio_client_interceptors())
    server = grpc.server(executor, interceptors=[ServerTracingInterceptor()])          # sync
    channel = grpc.intercept_channel(grpc.insecure_channel(addr), *client_interceptors())

An interceptor never fails a call: tracing errors are swallowed by the OpenTelemetry SDK and a
disabled tracer yields non-recording spans.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation import grpc as otel_grpc
from opentelemetry.instrumentation.grpc import filters
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

UNTRACED_SERVICE_PREFIXES = ("grpc.health.", "grpc.reflection.")


class _SemconvTracer:
    """Names each span ``pkg.Service/Method``; everything else goes to the current tracer."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self._tracer = trace.get_tracer_provider().get_tracer(*args, **kwargs)

    def start_as_current_span(self, name: str, *args: Any, **kwargs: Any):
        return self._tracer.start_as_current_span(name.lstrip("/"), *args, **kwargs)

    def start_span(self, name: str, *args: Any, **kwargs: Any):
        return self._tracer.start_span(name.lstrip("/"), *args, **kwargs)


class _SemconvTracerProvider:
    def get_tracer(self, *args: Any, **kwargs: Any) -> _SemconvTracer:
        return _SemconvTracer(args, kwargs)


_PROVIDER = _SemconvTracerProvider()


def _traced(exclude: Sequence[str] = ()):
    """The filter: every method but health, reflection and ``exclude`` (full paths)."""
    skip = [filters.service_prefix(p) for p in UNTRACED_SERVICE_PREFIXES]
    skip += [filters.full_method_name(m) for m in exclude]
    return filters.negate(filters.any_of(*skip))


class AioServerTracingInterceptor(grpc.aio.ServerInterceptor):
    """For ``grpc.aio.server(interceptors=[...])``; ``exclude``: full method paths left untraced."""

    def __init__(self, exclude: Sequence[str] = ()) -> None:
        self._inner = otel_grpc.aio_server_interceptor(
            tracer_provider=_PROVIDER, filter_=_traced(exclude)
        )

    async def intercept_service(self, continuation, handler_call_details):
        return await self._inner.intercept_service(continuation, handler_call_details)


class ServerTracingInterceptor(grpc.ServerInterceptor):
    """For ``grpc.server(..., interceptors=[...])`` (sync servers: the kvstore)."""

    def __init__(self) -> None:
        self._inner = otel_grpc.server_interceptor(tracer_provider=_PROVIDER, filter_=_traced())

    def intercept_service(self, continuation, handler_call_details):
        return self._inner.intercept_service(continuation, handler_call_details)


def aio_client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """For ``grpc.aio.insecure_channel(addr, interceptors=...)``: one per call kind."""
    return otel_grpc.aio_client_interceptors(tracer_provider=_PROVIDER, filter_=_traced())


def client_interceptors() -> list[Any]:
    """For :func:`traced_channel` (sync channels)."""
    return [otel_grpc.client_interceptor(tracer_provider=_PROVIDER, filter_=_traced())]


def traced_channel(channel: grpc.Channel) -> grpc.Channel:
    """A sync channel whose calls are CLIENT spans carrying the trace context."""
    return intercept_channel(channel, *client_interceptors())


def metadata_carrier(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    """The string entries of gRPC metadata, for :func:`pdserve.telemetry.extract_context`."""
    return {k: v for k, v in (metadata or ()) if isinstance(v, str)}
