"""Who may call a cluster service: the peer's certificate or the cluster token.

A server under :class:`ClusterAuthInterceptor` (sync) or :class:`AioClusterAuthInterceptor`
(grpc.aio) answers every RPC but the health check with UNAUTHENTICATED unless the caller is
a service of this cluster:

- mutual TLS on: the TLS handshake already refused certificates the cluster CA did not sign;
  the caller's certificate must also name a service of this cluster
  (``spiffe://<cluster_name>/<router|prefill|decode|kvstore>``), so a certificate the same CA
  issued to anything else (an operator, another cluster) is refused too;
- mutual TLS off and a cluster token set: the ``x-pdserve-cluster-token`` metadata entry must
  equal it (compared in constant time);
- neither: every caller is admitted (development only; the server logs a warning).

Health checks stay open so orchestrators can probe without credentials; they reveal only
SERVING or NOT_SERVING.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import grpc
import structlog

log = structlog.get_logger(__name__)

SERVICE_ROLES = ("router", "prefill", "decode", "kvstore")
TOKEN_METADATA_KEY = "x-pdserve-cluster-token"
_OPEN_PREFIXES = ("/grpc.health.",)


def spiffe_id(cluster_name: str, role: str) -> str:
    return f"spiffe://{cluster_name}/{role}"


@dataclass(frozen=True)
class ClusterAuthPolicy:
    """What a server demands of its callers (see the module docstring)."""

    cluster_name: str
    mutual: bool
    token: str | None = field(default=None, repr=False)  # never in a log line

    @property
    def is_open(self) -> bool:
        return not self.mutual and not self.token

    def refusal(
        self, method: str, auth_context: Mapping[str, Iterable[bytes]], metadata: Mapping[str, str]
    ) -> str | None:
        """Why the call must be refused, or None to admit it (a refusal is logged, without
        the token)."""
        reason = self._reason(method, auth_context, metadata)
        if reason is not None:
            log.warning("cluster_auth.refused", method=method, reason=reason)
        return reason

    def _reason(
        self, method: str, auth_context: Mapping[str, Iterable[bytes]], metadata: Mapping[str, str]
    ) -> str | None:
        if self.is_open or method.startswith(_OPEN_PREFIXES):
            return None
        if self.mutual:
            allowed = {spiffe_id(self.cluster_name, r).encode() for r in SERVICE_ROLES}
            names = set(auth_context.get("x509_subject_alternative_name", ()))
            if names & allowed:
                return None
            return (
                f"the client certificate does not name a service of cluster {self.cluster_name!r}"
            )
        sent = metadata.get(TOKEN_METADATA_KEY, "")
        if self.token and hmac.compare_digest(sent.encode(), self.token.encode()):
            return None
        return "missing or wrong cluster token"


# ---- servers ------------------------------------------------------------------------------

_FACTORIES = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def _wrap(handler: grpc.RpcMethodHandler, wrap: Callable) -> grpc.RpcMethodHandler:
    attr, factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(
        wrap(getattr(handler, attr), handler.response_streaming),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _metadata(context) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


class ClusterAuthInterceptor(grpc.ServerInterceptor):
    """Sync servers (the kvstore): refuse strangers before the handler runs."""

    def __init__(self, policy: ClusterAuthPolicy) -> None:
        self._policy = policy

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self._policy.is_open or method.startswith(_OPEN_PREFIXES):
            return handler
        return _wrap(handler, lambda behavior, streaming: self._guard(method, behavior, streaming))

    def _guard(self, method: str, behavior: Callable, streaming: bool) -> Callable:
        def check(context) -> None:
            reason = self._policy.refusal(method, context.auth_context(), _metadata(context))
            if reason is not None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        if streaming:

            def stream(request, context):
                check(context)
                yield from behavior(request, context)

            return stream

        def unary(request, context):
            check(context)
            return behavior(request, context)

        return unary


class AioClusterAuthInterceptor(grpc.aio.ServerInterceptor):
    """grpc.aio servers (prefill, decode): the same check, awaited."""

    def __init__(self, policy: ClusterAuthPolicy) -> None:
        self._policy = policy

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self._policy.is_open or method.startswith(_OPEN_PREFIXES):
            return handler
        return _wrap(handler, lambda behavior, streaming: self._guard(method, behavior, streaming))

    def _guard(self, method: str, behavior: Callable, streaming: bool) -> Callable:
        async def check(context) -> None:
            reason = self._policy.refusal(method, context.auth_context(), _metadata(context))
            if reason is not None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        if streaming:

            async def stream(request, context):
                await check(context)
                async for response in behavior(request, context):
                    yield response

            return stream

        async def unary(request, context):
            await check(context)
            return await behavior(request, context)

        return unary


# ---- clients ------------------------------------------------------------------------------


class _Details:
    """A ClientCallDetails with the token added to its metadata."""

    def __init__(self, details, token: str) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = [*(details.metadata or ()), (TOKEN_METADATA_KEY, token)]
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class TokenClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Sync channels: send the cluster token with every call."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _call(self, continuation, details, request):
        return continuation(_Details(details, self._token), request)

    intercept_unary_unary = _call
    intercept_unary_stream = _call
    intercept_stream_unary = _call
    intercept_stream_stream = _call


def aio_token_interceptors(token: str | None) -> list[grpc.aio.ClientInterceptor]:
    """grpc.aio channels: one interceptor per call kind (none without a token)."""
    if not token:
        return []

    def details(d) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(d.metadata or ()), (TOKEN_METADATA_KEY, token))
        return grpc.aio.ClientCallDetails(
            d.method, d.timeout, metadata, d.credentials, d.wait_for_ready
        )

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, client_call_details, request):
            return await continuation(details(client_call_details), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, client_call_details, request):
            return await continuation(details(client_call_details), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, client_call_details, request_iter):
            return await continuation(details(client_call_details), request_iter)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation, client_call_details, request_iter):
            return await continuation(details(client_call_details), request_iter)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]
