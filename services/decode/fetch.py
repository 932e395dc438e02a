"""Reading a request's KV blocks from a kvstore, on the fetch thread pool.

Source order (fastest first): the decode engine's own prefix cache (checked on the engine
thread before a fetch is started), the node's kvstore through shared memory (same node:
the blocks are pinned by a lease while they are copied out, then verified), a remote
kvstore over gRPC streaming. Every block is checked (length, xxh3-64) by the transport; a
missing or corrupt block ends the usable prefix, it is never imported.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from pdserve.kv.compression import KVGeometry
from pdserve.kv.grpc_transport import GrpcTransport, SharedMemoryTransport
from pdserve.kv.transport import KVTransport, TraceContext
from pdserve.tls import ClusterSecurity
from pdserve.wire import KVSource
from services.decode.layers import StagedReads
from services.decode.staged import StagedPins, StagedRanges, StartSpan

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class FetchResult:
    payloads: list  # the verified blocks, a prefix of the keys asked for
    error: str | None
    seconds: float
    transport: str  # "shm" | "grpc" | ""
    tier: str = ""  # the tier that served most of the blocks ("dram", ...); "" when none

    @property
    def num_bytes(self) -> int:
        return sum(len(p) for p in self.payloads)


class KVFetcher:
    """Connections to kvstores by address (built lazily, dropped after an error)."""

    def __init__(
        self,
        node_id: str,
        *,
        allow_shm: bool,
        timeout_s: float,
        security: ClusterSecurity,
        connect: Callable[[KVSource], KVTransport] | None = None,
        int8_geometry: KVGeometry | None = None,
    ) -> None:
        """``connect`` builds the transport to a source's kvstore; default: shared memory for a
        kvstore on this node (when allowed), gRPC otherwise, with blocks of ``int8_geometry``
        int8-encoded on that wire when it is set (pdserve.kv.compression)."""
        self._node_id = node_id
        self._allow_shm = allow_shm
        self._timeout_s = timeout_s
        self._security = security
        self._connect = connect or self._connect_over_network
        self._int8_geometry = int8_geometry
        self._transports: dict[str, KVTransport] = {}
        self._lock = threading.Lock()

    def _connect_over_network(self, source: KVSource) -> KVTransport:
        address, timeout_s = source.kvstore_address, self._timeout_s
        if self._allow_shm and source.node_id == self._node_id:
            return SharedMemoryTransport(address, timeout_s=timeout_s, security=self._security)
        return GrpcTransport(
            address, timeout_s=timeout_s, security=self._security,
            int8_geometry=self._int8_geometry,
        )  # fmt: skip

    def _transport(self, source: KVSource) -> KVTransport:
        with self._lock:
            transport = self._transports.get(source.kvstore_address)
        if transport is not None:
            return transport
        transport = self._connect(source)
        with self._lock:
            return self._transports.setdefault(source.kvstore_address, transport)

    def _drop(self, address: str) -> None:
        with self._lock:
            self._transports.pop(address, None)  # the old one is left to the GC

    def staged_reads(self, source: KVSource, start_span: StartSpan) -> StagedReads | None:
        """How a request's layer pulls read the source's kvstore, by the transport's kind:
        pinned in its shared segment (mapped here), or GetStaged over gRPC (another host).
        None when the store cannot be reached (the whole-block fetch will retry and report),
        or when blocks are int8-encoded on the wire (layer pulls are exact: they would send
        the bytes the operator chose not to send; blocks are fetched whole after the seal)."""
        try:
            transport = self._transport(source)
        except Exception as exc:  # noqa: BLE001 - the whole-block fetch will retry and report
            log.debug("decode.kv_connect_failed", address=source.kvstore_address, error=str(exc))
            return None
        if transport.kind == "shm":
            return StagedPins(transport, start_span)
        if self._int8_geometry is not None:
            return None
        return StagedRanges(transport, start_span)

    def fetch(
        self, source: KVSource, keys: Sequence[bytes], *, trace_context: TraceContext | None = None
    ) -> FetchResult:
        """The longest verified prefix of ``keys`` that the source's kvstore holds.

        ``trace_context`` goes into the kvstore's Get/MapShared header (its span links to it)."""
        start = time.perf_counter()
        name = ""
        try:
            transport = self._transport(source)
            name = transport.kind
            got = transport.get_blocks_tiered(list(keys), trace_context=trace_context)
        except Exception as exc:  # noqa: BLE001 - any failure is a miss; the caller recomputes
            self._drop(source.kvstore_address)
            log.warning("decode.kv_fetch_failed", address=source.kvstore_address, error=str(exc))
            return FetchResult([], str(exc), time.perf_counter() - start, name)
        found = list(itertools.takewhile(lambda b: b is not None, got))
        tiers = collections.Counter(tier.label for _, tier in found)
        tier = tiers.most_common(1)[0][0] if tiers else ""
        payloads = [data for data, _ in found]
        return FetchResult(payloads, None, time.perf_counter() - start, name, tier)

    def close(self) -> None:
        with self._lock:
            transports, self._transports = list(self._transports.values()), {}
        for transport in transports:
            transport.close()
