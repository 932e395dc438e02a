"""The KV transport interface, its result types, and the in-process implementation.

Every way of reaching a kvstore (gRPC stream to a remote peer, same-host shared memory, a
store living in this very process) implements :class:`KVTransport`, so prefill and decode
code is written once and tests swap in :class:`InProcessTransport`. An RDMA engine
(Mooncake Transfer Engine, NIXL) would be one more subclass.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from pdserve.kv.blocks import BlockKey, Tier, checksum

Buffer = bytes | bytearray | memoryview
TraceContext = Mapping[str, str]


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``[offset, offset + length)`` of one block."""

    key: BlockKey
    offset: int
    length: int


@dataclass(frozen=True)
class PutResult:
    num_stored: int
    num_skipped: int
    tiers: tuple[Tier, ...]  # tier each stored block landed in, in seal order


@dataclass(frozen=True)
class LookupResult:
    tiers: tuple[Tier | None, ...]  # per key; None = not held
    prefix_blocks: int  # number of leading keys held


@dataclass(frozen=True)
class Lease:
    lease_id: str
    pinned: tuple[BlockKey, ...]
    missing: tuple[BlockKey, ...]
    expires_unix_ms: int


@dataclass(frozen=True)
class DeleteResult:
    num_deleted: int
    pinned: tuple[BlockKey, ...]  # not deleted: held by a lease or being moved


@dataclass(frozen=True)
class TierStats:
    tier: Tier
    capacity_bytes: int
    used_bytes: int
    num_blocks: int
    num_evicted: int
    num_promoted_in: int
    num_demoted_in: int


@dataclass(frozen=True)
class StoreStats:
    node_id: str
    block_size_bytes: int
    tiers: tuple[TierStats, ...]
    num_pinned_blocks: int
    num_staging_blocks: int
    num_hits: int
    num_misses: int
    num_corrupt: int
    num_leases: int = 0  # open leases: pins, shared-memory maps, staged reads in progress

    def tier(self, tier: Tier) -> TierStats | None:
        return next((t for t in self.tiers if t.tier == tier), None)


class BlockWriter(abc.ABC):
    """Writes blocks piece by piece; a block becomes visible at its seal.

    ``write`` may be called for any byte range of a block, in any order, before ``seal``;
    ``checksum`` at the seal is :func:`pdserve.kv.blocks.checksum` of the whole block.
    ``close`` finishes the batch and returns what was stored; on error, or on ``abort``,
    blocks sealed so far stay stored and unsealed ones are dropped. Use as a context manager.
    """

    @abc.abstractmethod
    def write(self, key: BlockKey, offset: int, data: Buffer) -> None: ...

    @abc.abstractmethod
    def seal(self, key: BlockKey, checksum: int) -> None: ...

    @abc.abstractmethod
    def close(self) -> PutResult: ...

    @abc.abstractmethod
    def abort(self) -> None: ...

    def reserve(self, keys: Sequence[BlockKey]) -> None:  # noqa: B027 - optional capability
        """Announce the blocks this writer is about to write. A shared-memory writer reserves
        every slot in one round trip; others need nothing."""

    def slot_offset(self, key: BlockKey) -> int | None:
        """Where a shared-memory writer's staging slot for ``key`` starts in the store's
        segment (a same-host reader may copy written layers before the seal, verifying them
        against the block's checksum); None for other writers and for skipped keys."""
        return None

    def put(self, key: BlockKey, data: Buffer) -> None:
        """Write a whole block and seal it."""
        self.write(key, 0, data)
        self.seal(key, checksum(data))

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class KVTransport(abc.ABC):
    """A connection to one kvstore. Thread-safe; ``get_blocks`` never returns unverified bytes.

    ``kind`` names the path the bytes take (``"shm"``, ``"grpc"``, ``"inproc"``): metrics and
    spans label transfers with it, and callers choose behaviour by it, never by probing."""

    @property
    @abc.abstractmethod
    def kind(self) -> str: ...

    @property
    @abc.abstractmethod
    def block_size_bytes(self) -> int: ...

    @abc.abstractmethod
    def open_writer(
        self, *, trace_context: TraceContext | None = None, skip_existing: bool = False
    ) -> BlockWriter: ...

    @abc.abstractmethod
    def get_blocks(
        self, keys: Sequence[BlockKey], *, trace_context: TraceContext | None = None
    ) -> list[Buffer | None]:
        """The blocks in key order; None for a miss (absent, or failed its checksum)."""

    def get_blocks_tiered(
        self, keys: Sequence[BlockKey], *, trace_context: TraceContext | None = None
    ) -> list[tuple[Buffer, Tier] | None]:
        """Like :meth:`get_blocks`, with the tier that served each block (for telemetry)."""
        return [
            None if data is None else (data, Tier.DRAM)
            for data in self.get_blocks(keys, trace_context=trace_context)
        ]

    @abc.abstractmethod
    def read_staged_into(
        self,
        ranges: Sequence[ByteRange],
        out: Sequence[memoryview | bytearray],
        *,
        trace_context: TraceContext | None = None,
    ) -> list[bool]:
        """Copy byte ranges of blocks that are being written (the layers put so far) or
        stored into ``out[i]`` (``ranges[i].length`` bytes each). True where ``out[i]`` now
        holds the range as the store had it, False where the store has no such block.
        UNVERIFIED: a staged block has no checksum yet; the caller hashes what it read and
        compares with the block's checksum once it holds the whole block. The store counts a
        hit or miss per block per call, and pins the blocks while it reads them."""

    @abc.abstractmethod
    def lookup(self, keys: Sequence[BlockKey]) -> LookupResult: ...

    @abc.abstractmethod
    def pin(
        self, keys: Sequence[BlockKey], *, ttl_s: float | None = None, lease_id: str | None = None
    ) -> Lease: ...

    @abc.abstractmethod
    def unpin(self, lease_id: str) -> int: ...

    @abc.abstractmethod
    def delete(self, keys: Sequence[BlockKey]) -> DeleteResult: ...

    @abc.abstractmethod
    def stats(self) -> StoreStats: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and mappings."""

    def put_blocks(
        self,
        blocks: Sequence[tuple[BlockKey, Buffer]],
        *,
        trace_context: TraceContext | None = None,
        skip_existing: bool = False,
    ) -> PutResult:
        """Write whole blocks in one batch."""
        with self.open_writer(trace_context=trace_context, skip_existing=skip_existing) as writer:
            for key, data in blocks:
                writer.put(key, data)
        return writer.close()

    def __enter__(self) -> KVTransport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PutSessionLike(Protocol):
    def chunk(self, key: bytes, offset: int, data: Buffer) -> None: ...
    def seal(self, key: bytes, checksum: int) -> None: ...
    def finish(self) -> PutResult: ...
    def abort(self) -> None: ...


class StoreLike(Protocol):
    """What :class:`InProcessTransport` needs of a store (services.kvstore.store.TieredStore)."""

    block_size_bytes: int

    def open_put(
        self, *, skip_existing: bool = False, trace_context: TraceContext | None = None
    ) -> PutSessionLike: ...
    def get(self, key: bytes) -> tuple[bytearray, Tier, int] | None: ...
    def reading_ranges(self, ranges: Sequence[tuple[bytes, int, int]]): ...
    def lookup(self, keys: Sequence[bytes]) -> LookupResult: ...
    def pin(self, keys: Sequence[bytes], ttl_s: float | None, lease_id: str | None) -> Lease: ...
    def unpin(self, lease_id: str) -> int: ...
    def delete(self, keys: Sequence[bytes]) -> DeleteResult: ...
    def stats(self) -> StoreStats: ...


class _InProcessWriter(BlockWriter):
    def __init__(self, session: PutSessionLike) -> None:
        self._session = session
        self._result: PutResult | None = None

    def write(self, key: BlockKey, offset: int, data: Buffer) -> None:
        self._session.chunk(key, offset, data)

    def seal(self, key: BlockKey, checksum: int) -> None:
        self._session.seal(key, checksum)

    def close(self) -> PutResult:
        if self._result is None:
            self._result = self._session.finish()
        return self._result

    def abort(self) -> None:
        self._session.abort()


class InProcessTransport(KVTransport):
    """Calls a store in this process directly: same semantics, no serialization."""

    def __init__(self, store: StoreLike) -> None:
        self._store = store

    @property
    def kind(self) -> str:
        return "inproc"

    @property
    def block_size_bytes(self) -> int:
        return self._store.block_size_bytes

    def open_writer(self, *, trace_context=None, skip_existing=False) -> BlockWriter:
        return _InProcessWriter(
            self._store.open_put(skip_existing=skip_existing, trace_context=trace_context)
        )

    def get_blocks(self, keys, *, trace_context=None) -> list[Buffer | None]:
        return [None if f is None else f[0] for f in self.get_blocks_tiered(keys)]

    def get_blocks_tiered(self, keys, *, trace_context=None) -> list[tuple[Buffer, Tier] | None]:
        out: list[tuple[Buffer, Tier] | None] = []
        for key in keys:
            found = self._store.get(key)
            out.append(None if found is None else (found[0], found[1]))
        return out

    def read_staged_into(self, ranges, out, *, trace_context=None) -> list[bool]:
        with self._store.reading_ranges([(r.key, r.offset, r.length) for r in ranges]) as (
            _,
            found,
        ):
            for got, dst in zip(found, out, strict=True):
                if got is not None:
                    memoryview(dst)[:] = got[0]
            return [got is not None for got in found]

    def lookup(self, keys) -> LookupResult:
        return self._store.lookup(keys)

    def pin(self, keys, *, ttl_s=None, lease_id=None) -> Lease:
        return self._store.pin(keys, ttl_s, lease_id)

    def unpin(self, lease_id: str) -> int:
        return self._store.unpin(lease_id)

    def delete(self, keys) -> DeleteResult:
        return self._store.delete(keys)

    def stats(self) -> StoreStats:
        return self._store.stats()
