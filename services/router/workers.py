"""Calls from the router to prefill and decode workers (grpc.aio), and worker discovery.

gRPC failures are turned into :class:`WorkerCallError` here, so the router's logic never
sees a grpc type. Discovery polls the Redis worker registry and tails the KV location index
on background threads; when Redis is down the last known workers stay in rotation and the
index goes stale (routing degrades to load-only, serving continues).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog

from pdserve import metrics
from pdserve._proto.pdserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
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

log = structlog.get_logger(__name__)


class WorkerCallError(Exception):
    """A worker RPC failed. ``kind``: unavailable | invalid | deadline | other."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


_KIND = {
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.CANCELLED: "unavailable",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded",
}


def _call_error(exc: grpc.RpcError) -> WorkerCallError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return WorkerCallError(_KIND.get(code, "other"), f"{getattr(code, 'name', code)}: {details}")


class WorkerClients:
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

    async def prefill(
        self, address: str, request: prefill_pb2.PrefillRequest, timeout_s: float
    ) -> prefill_pb2.PrefillResponse:
        stub = prefill_pb2_grpc.PrefillStub(self._channel(address))
        try:
            return await stub.Prefill(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise _call_error(exc) from None

    async def decode(
        self, address: str, request: decode_pb2.DecodeRequest, timeout_s: float
    ) -> AsyncIterator[decode_pb2.DecodeChunk]:
        """The decode stream; closing the iterator cancels the RPC (the worker aborts)."""
        stub = decode_pb2_grpc.DecodeStub(self._channel(address))
        call = stub.Decode(request, timeout=timeout_s)
        try:
            async for chunk in call:
                yield chunk
        except grpc.RpcError as exc:
            raise _call_error(exc) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        self._channels.clear()


class WorkerDirectory:
    """Live prefill and decode workers (Redis registry) and the KV location index."""

    def __init__(
        self, connect_redis: Callable[[], Any], cluster: str, ttl_s: float, refresh_s: float
    ) -> None:
        """``connect_redis``: a new client each call (``pdserve.kv.metadata.connect_for``)."""
        self._redis = connect_redis()
        layout = RedisLayout(cluster)
        self._registry = WorkerRegistry(self._redis, layout, ttl_s)
        self.index = LocationIndex(connect_redis(), layout)
        self._refresh_s = refresh_s
        self._workers: dict[str, list[WorkerInfo]] = {"prefill": [], "decode": []}
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
        self.redis_ok = True
        self._workers = {
            role: [w for w in found if w.role == role] for role in ("prefill", "decode")
        }
        for role, workers in self._workers.items():
            metrics.WORKERS.labels(role).set(len(workers))

    def _run(self) -> None:
        while not self._stop.wait(self._refresh_s):
            self.refresh()

    def workers(self, role: str) -> list[WorkerInfo]:
        return list(self._workers.get(role, ()))

    def prefixes(self, keys) -> list[NodePrefix]:
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
