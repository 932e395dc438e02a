"""A decode request's reads of the blocks its prefill is still writing (layer pulls, same host).

:class:`StagedPins` is the :class:`~services.decode.layers.StagedReads` of one followed
request over the kvstore's shared memory: each ``pin`` is one MapShared with staged blocks
(the store counts a hit per block, opens its ``kv.get`` span and pins the blocks under a
lease, so a slot the prefill gives up is not reused under this reader), the layers are read
straight out of the segment, and the lease is given back (Unpin) once all its blocks are done,
or by :meth:`StagedPins.close` on every other path (the lease's TTL is the store's backstop).

Telemetry: one ``kv.fetch`` span per lease, from the pin to the unpin (bytes read under it,
blocks verified; transport shm, tier staging), parent of the kvstore's spans of both calls.
Not thread-safe: one follow thread uses it.
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
from pdserve.telemetry import Attr, inject_context

log = structlog.get_logger(__name__)
LEASE_TTL_S = 60.0  # the store drops a lease its reader never gave back after this long
_LABELS = ("get", "shm", "staging")


@dataclass(eq=False)
class _Lease:
    lease_id: str
    span: trace.Span
    pending: set[bytes]
    started: float = field(default_factory=time.perf_counter)
    num_bytes: int = 0
    num_verified: int = 0


class StagedPins:
    """See the module docstring. ``start_span`` opens a request's ``kv.fetch`` span."""

    def __init__(
        self, transport: SharedMemoryTransport, start_span: Callable[[], trace.Span]
    ) -> None:
        self._transport = transport
        self._start_span = start_span
        self._lease_of: dict[bytes, _Lease] = {}

    def pin(self, keys: Sequence[bytes]) -> list[int | None]:
        span = self._start_span()
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
        held = {k for k, o in zip(keys, offsets, strict=True) if o is not None}
        lease = _Lease(lease_id, span, held)
        for key in lease.pending:
            self._lease_of[key] = lease
        if not lease.pending:
            self._end(lease)
        return offsets

    def read(self, key: bytes, offset: int, num_bytes: int) -> memoryview:
        self._lease_of[key].num_bytes += num_bytes
        return self._transport.segment_range(offset, num_bytes)

    def release(self, keys: Sequence[bytes], verified: Sequence[bool]) -> None:
        for key, ok in zip(keys, verified, strict=True):
            lease = self._lease_of.pop(key, None)
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
        metrics.KV_TRANSFER_BYTES.labels(*_LABELS).inc(lease.num_bytes)
        metrics.KV_TRANSFER_BLOCKS.labels(*_LABELS).inc(lease.num_verified)
        metrics.KV_TRANSFER_DURATION.labels(*_LABELS).observe(time.perf_counter() - lease.started)
