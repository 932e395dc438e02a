"""How the router reaches workers: discovery (:class:`WorkerDirectory`) and calls
(:class:`WorkerClients`), each an abstract class with one real implementation here and an
in-memory fake for tests (tests/serving/router_fakes.py).

The real clients are the only grpc users on the router's request path: they turn the core's
plain calls into worker RPCs, the replies back into plain data, and every gRPC failure into
a :class:`~pdserve.errors.WorkerCallError` whose ``failure`` says whether the worker is gone
(transport), busy, or refused the request.

Discovery polls the Redis worker registry and tails the KV location index on background
threads. It keeps the last known workers through a Redis outage and through a Redis restart
(an empty registry until the workers' next heartbeats): a worker stays listed until it has
been missing for ``ttl_s``, so "Redis lost its keys" never reads as "no workers".
"""

from __future__ import annotations

import abc
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import structlog

from pdserve import metrics, wire
from pdserve._proto.pdserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from pdserve.engine.block_hash import BlockKey
from pdserve.errors import Failure, WorkerCallError
from pdserve.grpc_tracing import aio_client_interceptors
from pdserve.kv.metadata import (
    REDIS_ERRORS,
    LocationIndex,
    NodePrefix,
    RedisLayout,
    WorkerInfo,
    WorkerRegistry,
)
from pdserve.tls import ClusterSecurity
from services.router.messages import DecodeCall, PrefillCall, Prefilled, Usage, WorkerChunk

log = structlog.get_logger(__name__)
ROLES = ("prefill", "decode")
PEERS = "router"  # the other router replicas: their heartbeats carry their admitted requests


class WorkerDirectory(abc.ABC):
    """Live prefill and decode workers and where KV blocks are cached."""

    redis_ok: bool = True

    @abc.abstractmethod
    def workers(self, role: str) -> list[WorkerInfo]:
        """Live workers of ``role``: prefill, decode, or router (this router's replicas)."""

    @abc.abstractmethod
    def prefixes(self, keys: Sequence[BlockKey]) -> list[NodePrefix]: ...

    def start(self) -> None:  # noqa: B027 - optional hook
        """Begin discovery (background refresh)."""

    def stop(self) -> None:  # noqa: B027 - optional hook
        """End discovery."""


class WorkerClients(abc.ABC):
    """Calls to workers; failures raise WorkerCallError."""

    @abc.abstractmethod
    async def prefill(self, address: str, call: PrefillCall, timeout_s: float) -> Prefilled: ...

    @abc.abstractmethod
    def decode(
        self, address: str, call: DecodeCall, timeout_s: float
    ) -> AsyncIterator[WorkerChunk]:
        """The decode stream; closing the iterator cancels the call (the worker aborts)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


# ---- gRPC clients ----

_FAILURE = {
    grpc.StatusCode.UNAVAILABLE: Failure.UNAVAILABLE,
    grpc.StatusCode.CANCELLED: Failure.UNAVAILABLE,  # the worker's server went away mid-call
    grpc.StatusCode.INVALID_ARGUMENT: Failure.INVALID,
    grpc.StatusCode.DEADLINE_EXCEEDED: Failure.DEADLINE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Failure.OVERLOADED,
}


def _call_error(exc: grpc.RpcError) -> WorkerCallError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    failure = _FAILURE.get(code, Failure.ERROR)
    return WorkerCallError(failure, f"{getattr(code, 'name', code)}: {details}")


def prefill_request(call: PrefillCall) -> prefill_pb2.PrefillRequest:
    return prefill_pb2.PrefillRequest(
        request_id=call.request_id,
        prompt_token_ids=call.prompt_token_ids,
        sampling=wire.sampling_to_proto(call.params),
        cache_salt=call.cache_salt or "",
    )


def prefilled_from_proto(msg: prefill_pb2.PrefillResponse) -> Prefilled:
    logprob = msg.first_logprob if msg.HasField("first_logprob") else None
    return Prefilled(
        first_token=wire.sampled_token_from_proto(msg.first_token_id, logprob),
        kv=wire.kv_source_from_proto(msg.kv if msg.HasField("kv") else None),
        num_computed_tokens=msg.num_computed_tokens,
        trace=wire.trace_from_proto(msg.trace if msg.HasField("trace") else None),
    )


def decode_request(call: DecodeCall) -> decode_pb2.DecodeRequest:
    msg = decode_pb2.DecodeRequest(
        request_id=call.request_id,
        prompt_token_ids=call.prompt_token_ids,
        sampling=wire.sampling_to_proto(call.params),
        cache_salt=call.cache_salt or "",
        kv_fetch_timeout_s=call.kv_fetch_timeout_s,
        resume_token_ids=list(call.resume_token_ids),
        prefill_address=call.prefill_address or "",
    )
    prefilled = call.prefilled
    if prefilled is not None:
        msg.first_token_id = prefilled.first_token.token_id
        if prefilled.first_token.logprob is not None:
            msg.first_logprob.CopyFrom(wire.logprob_to_proto(prefilled.first_token))
        if prefilled.kv is not None:
            msg.kv.CopyFrom(wire.kv_source_to_proto(prefilled.kv))
        # The prefill's span: the decode worker links its KV fetch to it.
        msg.trace.CopyFrom(wire.trace_to_proto(prefilled.trace))
    elif call.kv is not None:
        msg.kv.CopyFrom(wire.kv_source_to_proto(call.kv))
    return msg


def worker_chunk_from_proto(msg: decode_pb2.DecodeChunk) -> WorkerChunk:
    usage = None
    if msg.HasField("usage"):
        u = msg.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
    reason = wire.finish_reason_from_proto(msg.finish_reason)
    return WorkerChunk(
        token_ids=tuple(msg.token_ids),
        text=msg.text,
        logprobs=tuple(wire.sampled_token_from_proto(lp.token_id, lp) for lp in msg.logprobs),
        finish_reason=reason.value if reason is not None else None,
        usage=usage,
    )


class GrpcWorkerClients(WorkerClients):
    """One grpc.aio channel per worker address, created on first use."""

    def __init__(self, max_message_bytes: int, *, security: ClusterSecurity | None = None) -> None:
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._security = security or ClusterSecurity()
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        """mTLS and the cluster token when configured (see pdserve.tls)."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self._security.aio_channel(
                address, self._options, aio_client_interceptors()
            )
        return channel

    async def prefill(self, address: str, call: PrefillCall, timeout_s: float) -> Prefilled:
        stub = prefill_pb2_grpc.PrefillStub(self._channel(address))
        try:
            response = await stub.Prefill(prefill_request(call), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise _call_error(exc) from None
        return prefilled_from_proto(response)

    async def decode(
        self, address: str, call: DecodeCall, timeout_s: float
    ) -> AsyncIterator[WorkerChunk]:
        stub = decode_pb2_grpc.DecodeStub(self._channel(address))
        rpc = stub.Decode(decode_request(call), timeout=timeout_s)
        try:
            async for chunk in rpc:
                yield worker_chunk_from_proto(chunk)
        except grpc.RpcError as exc:
            raise _call_error(exc) from None
        finally:
            rpc.cancel()

    async def close(self) -> None:
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        self._channels.clear()


# ---- Redis discovery ----


class RedisWorkerDirectory(WorkerDirectory):
    """The Redis worker registry (polled) and the KV location index (tailed)."""

    def __init__(
        self, connect_redis: Callable[[], Any], cluster: str, ttl_s: float, refresh_s: float
    ) -> None:
        """``connect_redis``: a new client each call (``pdserve.kv.metadata.connect_for``)."""
        self._redis = connect_redis()
        layout = RedisLayout(cluster)
        self._registry = WorkerRegistry(self._redis, layout, ttl_s)
        self.index = LocationIndex(connect_redis(), layout)
        self._ttl_s = ttl_s
        self._refresh_s = refresh_s
        self._seen: dict[str, tuple[WorkerInfo, float]] = {}  # worker id -> (info, monotonic)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-directory", daemon=True)
        self.redis_ok = False

    @property
    def registry(self) -> WorkerRegistry:
        return self._registry

    def start(self) -> None:
        self.refresh()
        self._thread.start()
        self.index.start()

    def refresh(self) -> None:
        try:
            found = self._registry.workers()
        except REDIS_ERRORS as exc:
            metrics.REDIS_ERRORS.labels("registry").inc()
            if self.redis_ok:
                log.warning("router.redis_down", error=str(exc))
            self.redis_ok = False
            return
        if not self.redis_ok:
            log.info("router.redis_up", workers=len(found))
        self.redis_ok = True
        now = time.monotonic()
        seen = {w.worker_id: (w, now) for w in found if w.role in (*ROLES, PEERS)}
        for wid, (info, at) in self._seen.items():
            if wid not in seen and now - at < self._ttl_s:
                seen[wid] = (info, at)  # not heard of since a Redis restart: keep for a TTL
        self._seen = seen
        for role in ROLES:
            metrics.WORKERS.labels(role).set(len(self.workers(role)))

    def _run(self) -> None:
        while not self._stop.wait(self._refresh_s):
            self.refresh()

    def workers(self, role: str) -> list[WorkerInfo]:
        return [info for info, _ in self._seen.values() if info.role == role]

    def prefixes(self, keys: Sequence[BlockKey]) -> list[NodePrefix]:
        if not keys:
            return []
        try:
            return self.index.longest_prefixes(keys)
        except RuntimeError:  # the index swapped a dict under us; a stale answer is fine
            return []

    def stop(self) -> None:
        self._stop.set()
        self.index.stop()
        if self._thread.is_alive():
            self._thread.join(2.0)
