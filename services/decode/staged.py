"""A decode request's reads of the blocks its prefill is still writing (layer pulls).

Two :class:`~services.decode.layers.StagedReads`, one per kind of transport to the prefill's
kvstore (``KVTransport.kind``; ``KVFetcher.staged_reads`` picks):

- :class:`StagedPins`, the same host (``shm``): each ``pin`` is one MapShared with staged
  blocks (the store counts a hit per block, opens its ``kv.get`` span and pins the blocks under
  a lease, so a slot the prefill gives up is not reused under this reader), the layers are read
  straight out of the segment at the offset the store pinned (which must be the one the
  prefill announced), and the lease is given back (Unpin) once all its blocks are done, or by
  :meth:`StagedPins.close` on every other path (the lease's TTL is the store's backstop).
- :class:`StagedRanges`, another host (``grpc``): one GetStaged call per group, the group's
  byte range of each block, copied into one buffer this object keeps. The call holds its own
  lease on the store while it runs (released there on success, cancel, deadline or a broken
  connection, by the kvstore), so nothing is held between calls and ``close`` has nothing to
  give back. The store counts a hit per block per call.

Telemetry: one ``kv.fetch`` span per lease (shm: from the pin to the unpin, with the blocks
verified; grpc: the call, with the blocks read), the bytes read under it (transport, tier
``staging``), parent of the kvstore's spans; the transfer metrics count the same bytes and
the blocks verified. Not thread-safe: one follow thread uses each.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from pdserve import metrics
from pdserve.kv.errors import KVError
from pdserve.kv.grpc_transport import SharedMemoryTransport
from pdserve.kv.transport import ByteRange, KVTransport
from pdserve.telemetry import Attr, inject_context
from services.decode.layers import StagedLayers

log = structlog.get_logger(__name__)
LEASE_TTL_S = 60.0  # the store drops a lease its reader never gave back after this long
StartSpan = Callable[[str], trace.Span]  # a request's kv.fetch span, given the transport


def _labels(transport: str) -> tuple[str, str, str]:
    return ("get", transport, "staging")


@dataclass(eq=False)
class _Lease:
    lease_id: str
    span: trace.Span
    pending: set[bytes]
    started: float = field(default_factory=time.perf_counter)
    num_bytes: int = 0
    num_verified: int = 0


class StagedPins:
    """Same host; see the module docstring."""

    def __init__(self, transport: SharedMemoryTransport, start_span: StartSpan) -> None:
        self._transport = transport
        self._start_span = start_span
        self._lease_of: dict[bytes, _Lease] = {}
        self._offset_of: dict[bytes, int] = {}  # where the store pinned each held block

    def pin(self, keys: Sequence[bytes]) -> list[bool]:
        span = self._start_span("shm")
        try:
            with trace.use_span(span, end_on_exit=False):
                lease_id, offsets = self._transport.map_staged(
                    list(keys), ttl_s=LEASE_TTL_S, trace_context=inject_context()
                )
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"pin failed: {exc}"))
            span.end()
            raise
        held = {k: o for k, o in zip(keys, offsets, strict=True) if o is not None}
        lease = _Lease(lease_id, span, set(held))
        for key, offset in held.items():
            self._lease_of[key] = lease
            self._offset_of[key] = offset
        if not lease.pending:
            self._end(lease)
        return [key in held for key in keys]

    def read(self, group: StagedLayers, picked: Sequence[int]) -> list[memoryview | None]:
        out: list[memoryview | None] = []
        for j in picked:
            key, offset = group.keys[j], self._offset_of.get(group.keys[j])
            if offset is None or offset != group.slot_offsets[j]:
                out.append(None)  # the store holds it in another slot than the prefill wrote
                continue
            self._lease_of[key].num_bytes += group.nbytes
            out.append(self._transport.segment_range(offset + group.offset, group.nbytes))
        return out

    def release(self, keys: Sequence[bytes], verified: Sequence[bool]) -> None:
        for key, ok in zip(keys, verified, strict=True):
            lease = self._lease_of.pop(key, None)
            self._offset_of.pop(key, None)
            if lease is None:
                continue
            lease.pending.discard(key)
            lease.num_verified += ok
            if not lease.pending:
                self._end(lease)

    def close(self) -> None:
        """Give back every lease still held (the follow ended, however it ended)."""
        leases = list({id(lease): lease for lease in self._lease_of.values()}.values())
        self._lease_of.clear()
        self._offset_of.clear()
        for lease in leases:
            self._end(lease)

    def _end(self, lease: _Lease) -> None:
        span = lease.span
        with trace.use_span(span, end_on_exit=False):
            try:
                self._transport.unpin(lease.lease_id)
            except KVError as exc:  # unreachable store: the lease expires there
                log.warning("decode.unpin_failed", lease_id=lease.lease_id, error=str(exc))
                span.set_status(Status(StatusCode.ERROR, f"unpin failed: {exc}"))
        span.set_attributes({Attr.KV_BYTES: lease.num_bytes, Attr.KV_BLOCKS: lease.num_verified})
        span.end()
        labels = _labels("shm")
        metrics.KV_TRANSFER_BYTES.labels(*labels).inc(lease.num_bytes)
        metrics.KV_TRANSFER_BLOCKS.labels(*labels).inc(lease.num_verified)
        metrics.KV_TRANSFER_DURATION.labels(*labels).observe(time.perf_counter() - lease.started)


class StagedRanges:
    """Another host; see the module docstring."""

    def __init__(self, transport: KVTransport, start_span: StartSpan) -> None:
        self._transport = transport
        self._start_span = start_span
        self._labels = _labels(transport.kind)
        self._buffer = bytearray()  # the last call's ranges, block after block

    def pin(self, keys: Sequence[bytes]) -> list[bool]:
        """Nothing to hold between calls: each read's call holds its own lease."""
        return [True] * len(keys)

    def read(self, group: StagedLayers, picked: Sequence[int]) -> list[memoryview | None]:
        size = group.nbytes
        if len(self._buffer) < size * len(picked):
            self._buffer = bytearray(size * len(picked))  # views of the old one stay valid
        view = memoryview(self._buffer)
        out = [view[n * size : (n + 1) * size] for n in range(len(picked))]
        ranges = [ByteRange(group.keys[j], group.offset, size) for j in picked]
        started = time.perf_counter()
        with trace.use_span(self._start_span(self._transport.kind), end_on_exit=True) as span:
            found = self._transport.read_staged_into(ranges, out, trace_context=inject_context())
            num_bytes = size * sum(found)
            span.set_attributes({Attr.KV_BYTES: num_bytes, Attr.KV_BLOCKS: sum(found)})
        metrics.KV_TRANSFER_BYTES.labels(*self._labels).inc(num_bytes)
        metrics.KV_TRANSFER_DURATION.labels(*self._labels).observe(time.perf_counter() - started)
        return [piece if ok else None for piece, ok in zip(out, found, strict=True)]

    def release(self, keys: Sequence[bytes], verified: Sequence[bool]) -> None:
        metrics.KV_TRANSFER_BLOCKS.labels(*self._labels).inc(sum(verified))

    def close(self) -> None:
        """Nothing is held between calls."""
