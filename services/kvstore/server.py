"""gRPC wiring of the kvstore: messages in, store calls, messages out. No logic here.

Every typed store error is mapped in one place (:func:`_edge`), into pdserve.errors'
vocabulary, whose table gives the status (the KV errors' ``grpc_code`` agrees with it: the
clients map statuses back to the same types).

Telemetry: every RPC is a SERVER span (the tracing interceptor, parented on the caller's
``traceparent``); Put, Get and MapShared open a ``kv.put`` / ``kv.get`` span inside it,
linked to the request span named in the message header's trace context, with bytes, blocks,
tier, transport and node, and count the same in the KV transfer metrics.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import structlog
from grpc_health.v1 import health, health_pb2

from pdserve import metrics, port_file
from pdserve._proto.pdserve.v1 import kvstore_pb2, kvstore_pb2_grpc
from pdserve.cluster_auth import ClusterAuthInterceptor
from pdserve.config import KVStoreSettings, advertised_address
from pdserve.errors import (
    AlreadyExists,
    DataLoss,
    InternalError,
    InvalidRequest,
    NotFound,
    Overloaded,
    PdserveError,
    Unavailable,
    grpc_status,
)
from pdserve.grpc_server import add_health_and_reflection, server_options
from pdserve.grpc_tracing import ServerTracingInterceptor
from pdserve.kv.blocks import Tier, block_key, checksum, iter_chunks
from pdserve.kv.compression import KVGeometry, encode_int8
from pdserve.kv.errors import (
    BlockExistsError,
    CapacityError,
    ChecksumMismatchError,
    ChunkOrderError,
    InvalidBlockError,
    KVError,
    LeaseNotFoundError,
    StoreClosedError,
)
from pdserve.kv.frames import get_chunk_frame, parse_put_request
from pdserve.kv.shm import host_id
from pdserve.telemetry import Attr, get_tracer, links_from
from pdserve.tls import ClusterSecurity
from services.kvstore.node import KVStoreNode
from services.kvstore.store import TieredStore

log = structlog.get_logger(__name__)
tracer = get_tracer(__name__)
SERVICE_NAME = kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name


# The store's typed errors in pdserve's vocabulary (most specific class first in the MRO).
_AS_PDSERVE: dict[type[KVError], type[PdserveError]] = {
    InvalidBlockError: InvalidRequest,
    BlockExistsError: AlreadyExists,
    ChecksumMismatchError: DataLoss,
    CapacityError: Overloaded,
    LeaseNotFoundError: NotFound,
    StoreClosedError: Unavailable,
}


def as_pdserve_error(exc: KVError) -> PdserveError:
    cls = next((_AS_PDSERVE[c] for c in type(exc).__mro__ if c in _AS_PDSERVE), InternalError)
    return cls(str(exc))


def _edge(method):
    """Map typed store errors to gRPC statuses (unary and server-streaming handlers)."""

    def abort(context, exc: KVError):
        error = as_pdserve_error(exc)
        context.abort(grpc.StatusCode[grpc_status(error)], error.message)

    if method.__name__ in ("Get", "GetStaged"):

        @functools.wraps(method)
        def streaming(self, request, context):
            try:
                yield from method(self, request, context)
            except KVError as exc:
                abort(context, exc)

        return streaming

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except KVError as exc:
            abort(context, exc)

    return unary


def _trace(msg) -> dict[str, str]:
    return dict(msg.trace_context.entries) if msg.HasField("trace_context") else {}


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(self, store: TieredStore, settings: KVStoreSettings) -> None:
        self._store = store
        self._settings = settings

    @contextlib.contextmanager
    def _kv_span(self, direction: str, trace_context: dict[str, str]) -> Iterator[_Transfer]:
        """``kv.<direction>`` under the RPC's SERVER span, linked to the header's request."""
        transfer = _Transfer(direction, self._settings.node_id, self._store.block_size_bytes)
        attributes = {Attr.KV_DIRECTION: direction, Attr.KV_NODE: self._settings.node_id}
        with tracer.start_as_current_span(
            f"kv.{direction}", links=links_from(trace_context), attributes=attributes
        ) as span:
            yield transfer
            transfer.finish(span)

    @_edge
    def Put(self, request_iterator, context):
        """Frames in (pdserve.kv.frames): a chunk's bytes go from the received message to the
        staging slot in one copy."""
        requests = (parse_put_request(frame) for frame in request_iterator)
        first = next(requests, None)
        has_header = first is not None and first[1] is not None and first[1].HasField("header")
        header = first[1].header if has_header else kvstore_pb2.PutHeader()
        pending = [] if has_header or first is None else [first]
        with self._kv_span("put", _trace(header)) as transfer:
            session = self._store.open_put(
                skip_existing=header.skip_existing, trace_context=_trace(header)
            )
            try:
                for chunk, request in itertools.chain(pending, requests):
                    if chunk is not None:
                        session.chunk(*chunk)
                        transfer.transport = "grpc"  # bytes came over the stream
                        continue
                    kind = request.WhichOneof("kind")
                    if kind == "seal":
                        session.seal(request.seal.key, request.seal.checksum)
                    elif kind == "header":
                        raise ChunkOrderError("PutHeader must be the first message of a Put stream")
                    else:
                        raise ChunkOrderError("empty PutRequest: set header, chunk or seal")
            except KVError:
                session.abort()
                raise
            return _finish_put(session, transfer)

    @_edge
    def Get(self, request, context):
        """Frames out (pdserve.kv.frames): each chunk is framed straight from the store's slab,
        or from the block's int8 encoding when the request asks for it."""
        chunk_bytes = min(
            request.chunk_bytes or self._settings.chunk_bytes, self._settings.chunk_bytes
        )
        geometry = self._int8_geometry(request)
        with self._kv_span("get", _trace(request)) as transfer:
            transfer.transport = "grpc"
            if geometry is not None:
                transfer.block_size_bytes = geometry.int8_nbytes  # count what crossed the wire
            for key in request.keys:
                if geometry is None:
                    frame = functools.partial(get_chunk_frame, key)
                    found = self._store.get_chunks(block_key(key), chunk_bytes, frame)
                    wire_checksum = 0
                else:
                    found, wire_checksum = self._encoded_frames(key, chunk_bytes, geometry)
                if found is None:
                    end = kvstore_pb2.GetBlockEnd(key=key, found=False)
                    yield kvstore_pb2.GetResponse(end=end).SerializeToString()
                    continue
                frames, tier, block_checksum = found
                yield from frames
                end = kvstore_pb2.GetBlockEnd(
                    key=key, found=True, checksum=block_checksum, tier=tier,
                    wire_checksum=wire_checksum,
                )  # fmt: skip
                transfer.tiers.append(Tier(tier))
                yield kvstore_pb2.GetResponse(end=end).SerializeToString()

    def _int8_geometry(self, request) -> KVGeometry | None:
        if request.encoding == kvstore_pb2.KV_ENCODING_NONE:
            return None
        g = request.geometry
        try:
            geometry = KVGeometry(g.num_layers, g.block_size, g.num_kv_heads, g.head_dim, g.dtype)
        except ValueError as exc:
            raise InvalidBlockError(f"bad geometry for an encoded Get: {exc}") from None
        if geometry.block_nbytes != self._store.block_size_bytes:
            raise InvalidBlockError(
                f"geometry {geometry} makes {geometry.block_nbytes}-byte blocks; this store "
                f"holds {self._store.block_size_bytes}-byte blocks"
            )
        return geometry

    def _encoded_frames(self, key: bytes, chunk_bytes: int, geometry: KVGeometry):
        """((frames, tier, checksum) of the block's int8 encoding, its checksum), or (None, 0)."""
        found = self._store.get(block_key(key))  # a verified copy
        if found is None:
            return None, 0
        data, tier, block_checksum = found
        encoded = memoryview(encode_int8(data, geometry))
        frames = [
            get_chunk_frame(key, offset, piece)
            for offset, piece in iter_chunks(encoded, chunk_bytes)
        ]
        return (frames, tier, block_checksum), checksum(encoded)

    @_edge
    def Lookup(self, request, context):
        result = self._store.lookup(request.keys)
        return kvstore_pb2.LookupResponse(
            tiers=[t or 0 for t in result.tiers], prefix_blocks=result.prefix_blocks
        )

    @_edge
    def Pin(self, request, context):
        lease = self._store.pin(
            request.keys, request.ttl_ms / 1000 or None, request.lease_id or None
        )
        return kvstore_pb2.PinResponse(
            lease_id=lease.lease_id,
            pinned=lease.pinned,
            missing=lease.missing,
            expires_unix_ms=lease.expires_unix_ms,
        )

    @_edge
    def Unpin(self, request, context):
        return kvstore_pb2.UnpinResponse(num_released=self._store.unpin(request.lease_id))

    @_edge
    def Delete(self, request, context):
        result = self._store.delete(request.keys)
        return kvstore_pb2.DeleteResponse(num_deleted=result.num_deleted, pinned=result.pinned)

    @_edge
    def Stats(self, request, context):
        s = self._store.stats()
        tiers = [
            kvstore_pb2.TierStats(
                tier=t.tier, capacity_bytes=t.capacity_bytes, used_bytes=t.used_bytes, num_blocks=t.num_blocks,
                num_evicted=t.num_evicted, num_promoted_in=t.num_promoted_in, num_demoted_in=t.num_demoted_in,
            )
            for t in s.tiers
        ]  # fmt: skip
        return kvstore_pb2.StatsResponse(
            node_id=s.node_id, block_size_bytes=s.block_size_bytes, tiers=tiers,
            num_pinned_blocks=s.num_pinned_blocks, num_staging_blocks=s.num_staging_blocks,
            num_hits=s.num_hits, num_misses=s.num_misses, num_corrupt=s.num_corrupt,
            num_leases=s.num_leases,
        )  # fmt: skip

    @_edge
    def OpenSharedMemory(self, request, context):
        path = self._store.shm_path
        return kvstore_pb2.OpenSharedMemoryResponse(
            available=path is not None,
            path=str(path or ""),
            size_bytes=self._store.segment.size_bytes if path else 0,
            host_id=host_id(),
            block_size_bytes=self._store.block_size_bytes,
            staging_blocks=self._settings.staging_blocks,
        )

    @_edge
    def ReserveShared(self, request, context):
        offsets = self._store.reserve_shared(request.keys, skip_existing=request.skip_existing)
        size = self._store.block_size_bytes
        slots = [
            kvstore_pb2.SharedSlot(key=k, offset=o or 0, length=size if o is not None else 0)
            for k, o in zip(request.keys, offsets, strict=True)
        ]
        return kvstore_pb2.ReserveSharedResponse(slots=slots)

    @_edge
    def SealShared(self, request, context):
        """Seals of blocks a same-host writer put in its reserved slots: one message per
        batch, committed in place (unverified here: the writer hashed the slot's bytes,
        and every read verifies them; see TieredStore.seal)."""
        with self._kv_span("put", _trace(request)) as transfer:
            session = self._store.open_put(skip_existing=False, trace_context=_trace(request))
            try:
                for seal in request.seals:
                    session.seal(seal.key, seal.checksum, verify=False)
            except KVError:
                self._store.discard_staged([seal.key for seal in request.seals])
                raise
            return _finish_put(session, transfer)

    @_edge
    def ReleaseShared(self, request, context):
        keys = [block_key(k) for k in request.keys]
        return kvstore_pb2.ReleaseSharedResponse(num_released=self._store.discard_staged(keys))

    @_edge
    def MapShared(self, request, context):
        with self._kv_span("get", _trace(request)) as transfer:
            transfer.transport = "shm"
            lease_id, found = self._store.map_shared(
                request.keys, request.ttl_ms / 1000 or None, include_staged=request.include_staged
            )
            transfer.tiers.extend(Tier(f.tier) for f in found if f is not None)
        size = self._store.block_size_bytes
        slots = [
            kvstore_pb2.SharedSlot(key=k)
            if f is None
            else kvstore_pb2.SharedSlot(
                key=k,
                offset=f.offset,
                length=size,
                checksum=f.checksum,
                tier=f.tier,
                staged=f.staged,
            )  # fmt: skip
            for k, f in zip(request.keys, found, strict=True)
        ]
        return kvstore_pb2.MapSharedResponse(lease_id=lease_id, slots=slots)

    @_edge
    def GetStaged(self, request, context):
        """Byte ranges of staged or stored blocks, framed straight from the slab, read under
        a lease the call holds until it ends: the ``finally`` and grpc's termination callback
        (cancel, deadline, broken connection) both release it, whichever runs first."""
        chunk_bytes = min(
            request.chunk_bytes or self._settings.chunk_bytes, self._settings.chunk_bytes
        )
        ranges = [(r.key, r.offset, r.length) for r in request.ranges]
        with (
            self._kv_span("get", _trace(request)) as transfer,
            self._store.reading_ranges(ranges) as (lease_id, found),
        ):
            context.add_callback(lambda: self._store.unpin(lease_id))
            transfer.transport = "grpc"
            for (key, offset, _), got in zip(ranges, found, strict=True):
                if got is None:
                    yield kvstore_pb2.GetResponse(
                        end=kvstore_pb2.GetBlockEnd(key=key, found=False)
                    ).SerializeToString()
                    continue
                view, tier, block_checksum = got
                for start, piece in iter_chunks(view, chunk_bytes):
                    yield get_chunk_frame(key, offset + start, piece)
                transfer.add(Tier(tier), len(view))
                end = kvstore_pb2.GetBlockEnd(
                    key=key, found=True, checksum=block_checksum, tier=tier
                )
                yield kvstore_pb2.GetResponse(end=end).SerializeToString()


_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
}


_FRAMED_OUT = ("Get", "GetStaged")  # streams whose responses are pre-encoded frames


def add_kvstore_servicer(servicer: KVStoreServicer, server: grpc.Server) -> None:
    """``add_KVStoreServicer_to_server`` with Put's requests and Get's and GetStaged's
    responses left as bytes (the pre-encoded frames); every other message goes through
    protobuf as generated."""
    service = kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"]
    handlers = {}
    for method in service.methods:
        request = getattr(kvstore_pb2, method.input_type.name)
        response = getattr(kvstore_pb2, method.output_type.name)
        make = _HANDLERS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=None if method.name == "Put" else request.FromString,
            response_serializer=None if method.name in _FRAMED_OUT else response.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


class _Transfer:
    """What one Put/Get moved; ``finish`` puts it on the span and in the metrics.

    A Put whose bytes came through shared memory carries only seals: transport ``shm``.
    """

    def __init__(self, direction: str, node_id: str, block_size_bytes: int) -> None:
        self.direction, self.node_id, self.block_size_bytes = direction, node_id, block_size_bytes
        self.transport = "shm"
        self.tiers: list[Tier] = []  # one per whole block moved
        self.partial: list[tuple[Tier, int]] = []  # (tier, bytes) per byte range moved
        self.started = time.perf_counter()

    def add(self, tier: Tier, num_bytes: int) -> None:
        """A byte range of a block was moved (GetStaged): counted as one block."""
        self.partial.append((tier, num_bytes))

    def finish(self, span) -> None:
        moved = [(t, self.block_size_bytes) for t in self.tiers] + self.partial
        by_tier = collections.Counter(t.label for t, _ in moved)
        bytes_by_tier = collections.Counter()
        for tier, num_bytes in moved:
            bytes_by_tier[tier.label] += num_bytes
        main_tier = by_tier.most_common(1)[0][0] if by_tier else "dram"
        span.set_attributes({
            Attr.KV_BYTES: sum(bytes_by_tier.values()), Attr.KV_BLOCKS: len(moved),
            Attr.KV_TIER: main_tier, Attr.KV_TRANSPORT: self.transport,
        })  # fmt: skip
        for tier, count in by_tier.items():
            labels = (self.direction, self.transport, tier)
            metrics.KV_TRANSFER_BLOCKS.labels(*labels).inc(count)
            metrics.KV_TRANSFER_BYTES.labels(*labels).inc(bytes_by_tier[tier])
        metrics.KV_TRANSFER_DURATION.labels(self.direction, self.transport, main_tier).observe(
            time.perf_counter() - self.started
        )


class KVStoreServer:
    """The gRPC server around one node, with health, reflection, tracing and ``/metrics``."""

    def __init__(self, settings: KVStoreSettings) -> None:
        self.settings = settings
        security = ClusterSecurity.from_settings(settings)
        policy = security.auth_policy()
        # Strangers are refused before anything else runs, on every RPC (MapShared and the
        # other shared-memory calls included): a KV block is as sensitive as its prompt.
        interceptors = [] if policy.is_open else [ClusterAuthInterceptor(policy)]
        self.server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=settings.grpc_workers, thread_name_prefix="kvstore-rpc"
            ),
            options=server_options(settings.max_message_bytes),
            interceptors=[*interceptors, ServerTracingInterceptor()],
        )
        self.metrics: metrics.MetricsServer | None = None
        self._stopping = False
        self.port = security.add_port(self.server, f"{settings.grpc_host}:{settings.grpc_port}")
        if policy.is_open:
            log.warning("kvstore.unauthenticated", hint="set tls_* files or cluster_token")
        address = advertised_address(settings.advertise_address, settings.node_id, self.port)
        self.node = KVStoreNode(settings, address=address)
        add_kvstore_servicer(KVStoreServicer(self.node.store, settings), self.server)
        self.health = add_health_and_reflection(self.server, SERVICE_NAME, health.HealthServicer())

    def start(self) -> None:
        self.node.start()
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        s = self.settings
        self.metrics = metrics.start_metrics_server(
            s.http_port, s.grpc_host, health=lambda: not self._stopping
        )
        metrics.set_service_info(role="kvstore", node=s.node_id, worker_id=self.node.worker_id)
        http_port = self.metrics.port if self.metrics else None
        port_file.write(s.port_file, grpc_port=self.port, http_port=http_port)
        log.info(
            "kvstore.listening", port=self.port, address=self.node.address,
            metrics_port=http_port,
        )  # fmt: skip

    def stop(self) -> None:
        """Drain: report NOT_SERVING, finish in-flight RPCs, then flush and deregister."""
        self._stopping = True
        self.health.enter_graceful_shutdown()
        self.server.stop(self.settings.shutdown_grace_s).wait()
        self.node.stop()
        if self.metrics is not None:
            self.metrics.stop()


def serve(settings: KVStoreSettings) -> None:
    server = KVStoreServer(settings)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    server.start()
    done.wait()
    log.info("kvstore.shutting_down")
    server.stop()


def _finish_put(session, transfer) -> kvstore_pb2.PutResponse:
    """Commit a put session's sealed blocks and answer with what was stored where."""
    result = session.finish()
    transfer.tiers.extend(result.tiers)
    return kvstore_pb2.PutResponse(
        num_stored=result.num_stored, num_skipped=result.num_skipped, tiers=list(result.tiers)
    )
