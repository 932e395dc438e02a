"""Tiered KV block store: placement, LRU demotion/promotion, leases, staging, KV events.

Lifecycle of a block::

    staging (pieces arriving, invisible) --seal, checksum ok--> stored in the highest tier
    with room --pressure--> demoted one tier down ... --> evicted from the last tier
    a hit in a lower tier --> promoted one tier up;   Delete, or a failed checksum --> gone

Invariants:
- Each tier keeps its blocks in an OrderedDict in LRU order: least recently used at the
  front. A hit moves a block to the back; a demoted or promoted block enters at the back.
- A victim is the front-most block that is not pinned (unexpired lease), not being read and
  not moving. Pinned blocks are never evicted, demoted or promoted, so a shared-memory
  reader's offsets stay valid for its lease.
- A block's slot passes to whoever planned the move out of it: the block that replaces it.
- Commit in place: the DRAM tier and the staging area share one slab (the shared-memory
  segment), so a block sealed into DRAM keeps the staging slot its writer filled; no byte is
  copied at the seal. Tiers count their blocks against their capacity; the slab has room
  for both capacities, so an allocation within them never fails.
- One directory lock (``_cond``) guards the maps and is held only for O(1) bookkeeping;
  copies, checksums and file I/O run outside it. A reader holds a read reference (no lock)
  while it copies; a mover owns its block exclusively (readers of a moving block wait).
- Every tier change emits a :class:`KVEvent` (under the lock, so ``seq`` follows the order
  of the changes); the sink must only enqueue.
- A lease may pin a staged block too (a layer-pipelined reader copies the layers written so
  far): its staging slot goes back to the pool only once no lease holds it, even after the
  block was dropped or sealed elsewhere; sealed in place, the lease pins the new entry.
  Slots so held count against ``staging_blocks``.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import mmap
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import structlog
import xxhash

from pdserve import metrics
from pdserve.config import KVStoreSettings
from pdserve.kv.blocks import BlockKey, PieceTracker, Tier, block_key, checksum
from pdserve.kv.errors import (
    BlockExistsError,
    CapacityError,
    ChecksumMismatchError,
    ChunkOrderError,
    InvalidBlockError,
    LeaseNotFoundError,
    StoreClosedError,
)
from pdserve.kv.shm import SharedSegment
from pdserve.kv.transport import DeleteResult, Lease, LookupResult, PutResult, StoreStats, TierStats
from services.kvstore.tiers import CorruptFileError, CudaSlabPool, SlabPool, SsdDir

log = structlog.get_logger(__name__)


class EventOp(str, enum.Enum):
    STORED = "stored"
    PROMOTED = "promoted"
    DEMOTED = "demoted"
    EVICTED = "evicted"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class KVEvent:
    seq: int
    op: EventOp
    key: BlockKey
    tier: Tier | None  # where the block is now; None: gone from this node
    from_tier: Tier | None


EventSink = Callable[[KVEvent], None]


@dataclass(eq=False, slots=True)
class _Entry:
    key: BlockKey
    tier: Tier
    loc: int
    checksum: int
    leases: set[str] = field(default_factory=set)
    readers: int = 0
    moving: bool = False
    corrupt: bool = False


@dataclass(eq=False, slots=True)
class _Staged:
    key: BlockKey
    slot: int
    tracker: PieceTracker
    touched_at: float
    writers: int = 0
    sealing: bool = False
    adopted: bool = False  # its slot became the stored block's (commit in place)
    # The running hash of the block's leading ``hashed_bytes`` bytes, fed as pieces that
    # continue them are copied in, so that the seal's check needs no second pass over the
    # slot. A piece arriving out of order, or while another is being hashed, is not hashed:
    # the prefix then never covers the block and the seal hashes the slot (-1: a failed copy).
    hasher: xxhash.xxh3_64 = field(default_factory=xxhash.xxh3_64)
    hashed_bytes: int = 0
    hashing: bool = False
    leases: set[str] = field(default_factory=set)  # readers of the slot (MapShared, GetStaged)
    dropped: bool = False  # gone from staging; its slot is freed when the last lease ends


@dataclass(slots=True)
class _LeaseState:
    expires_at: float
    keys: set[BlockKey]
    staged: list[_Staged] = field(default_factory=list)  # staging slots it holds


class Mapped(NamedTuple):
    """Where a mapped block lies in the segment (MapShared)."""

    offset: int
    checksum: int  # 0 for a staged block (not sealed: nobody vouches for its bytes yet)
    tier: Tier
    staged: bool


@dataclass(eq=False, slots=True)
class _Move:
    """``entry`` leaves its tier for ``dst`` (None: evicted) into location ``dst_loc``."""

    entry: _Entry
    dst: _TierState | None
    dst_loc: int


@dataclass(eq=False, slots=True)
class _Spare:
    """A location the planner may hand on: the one a promoted block is vacating."""

    index: int
    loc: int
    used: bool = False


class _TierState:
    """One tier: its backend, capacity and LRU order. Mutated under the directory lock."""

    def __init__(self, tier: Tier, backend, capacity_blocks: int) -> None:
        self.tier = tier
        self.backend = backend
        self.capacity_blocks = capacity_blocks
        self.lru: collections.OrderedDict[BlockKey, _Entry] = collections.OrderedDict()
        self._tokens = capacity_blocks  # blocks it may still take (a slab may be shared)
        self.num_evicted = self.num_promoted_in = self.num_demoted_in = 0

    @property
    def is_slab(self) -> bool:
        return not isinstance(self.backend, SsdDir)

    def take(self) -> int | None:
        if not self.adopt():
            return None
        return self.backend.allocate() if self.is_slab else 0

    def adopt(self) -> bool:
        """Count in a block whose slot is already allocated in this tier's slab."""
        if self._tokens == 0:
            return False
        self._tokens -= 1
        return True

    def give(self, loc: int) -> None:
        self._tokens += 1
        if self.is_slab:
            self.backend.free(loc)

    def write(self, loc: int, key: BlockKey, data, block_checksum: int) -> None:
        if self.is_slab:
            self.backend.write(loc, data)
        else:
            self.backend.write(key, data, block_checksum)

    def read(self, entry: _Entry):
        """The block's bytes: a view into the slab, or an owned buffer read from disk."""
        if self.is_slab:
            return self.backend.read(entry.loc)
        data, header_checksum = self.backend.read(entry.key)
        if header_checksum != entry.checksum:
            raise CorruptFileError(f"checksum in the header of {entry.key.hex()} changed")
        return data


def _copy(offset: int, piece: memoryview, hasher: xxhash.xxh3_64) -> bytes:
    out = bytes(piece)
    hasher.update(out)
    return out


class TieredStore:
    """The store logic behind the kvstore service (no gRPC here). Thread-safe."""

    def __init__(
        self,
        settings: KVStoreSettings,
        *,
        on_event: EventSink | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.block_size_bytes = settings.block_size_bytes
        self._on_event = on_event or (lambda event: None)
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._entries: dict[BlockKey, _Entry] = {}
        self._staging: dict[BlockKey, _Staged] = {}
        self._leases: dict[str, _LeaseState] = {}
        self._num_held_slots = 0  # slots of dropped staged blocks that a lease still holds
        self._seq = 0
        self._closed = False
        self.num_hits = self.num_misses = self.num_corrupt = 0
        self.segment, self._anon = self._make_segment()
        self._tiers = self._make_tiers()
        if not self._tiers:
            raise ValueError(
                "the kvstore has no tier: set dram_capacity_bytes or ssd_capacity_bytes"
            )
        self._reindex_ssd()

    # ---- construction ----

    def _dram_slots(self) -> int:
        return self.settings.dram_capacity_bytes // self.block_size_bytes

    def _make_segment(self) -> tuple[SharedSegment | None, mmap.mmap | None]:
        s = self.settings
        size = (self._dram_slots() + s.staging_blocks) * self.block_size_bytes
        if s.shm_enabled and s.shm_dir.is_dir():
            path = s.shm_dir / f"pdserve-{s.cluster_name}-{s.node_id}-{uuid.uuid4().hex[:8]}.kv"
            return SharedSegment.create(path, size), None
        anon = mmap.mmap(-1, size)
        return None, anon

    @property
    def _buffer(self) -> memoryview:
        return self.segment.view if self.segment else memoryview(self._anon)

    def _make_tiers(self) -> list[_TierState]:
        s, size = self.settings, self.block_size_bytes
        tiers = []
        if s.hbm_capacity_bytes and _cuda_available():
            slots = s.hbm_capacity_bytes // size
            tiers.append(_TierState(Tier.HBM, CudaSlabPool(slots, size), slots))
        dram_slots = self._dram_slots()
        # One slab for DRAM and staging: a sealed block is committed in place.
        self._staging_pool = SlabPool(self._buffer, 0, dram_slots + s.staging_blocks, size)
        if dram_slots:
            tiers.append(_TierState(Tier.DRAM, self._staging_pool, dram_slots))
        if s.ssd_capacity_bytes and s.ssd_dir is not None:
            slots = s.ssd_capacity_bytes // size
            tiers.append(_TierState(Tier.SSD, SsdDir(s.ssd_dir, size, fsync=s.ssd_fsync), slots))
        return tiers

    def _reindex_ssd(self) -> None:
        """Adopt the block files a previous run left (oldest first = LRU first)."""
        state = self._tier_state(Tier.SSD)
        if state is None:
            return
        for record in state.backend.scan():
            loc = state.take()
            if loc is None:
                state.backend.discard(record.key)
                continue
            entry = _Entry(record.key, Tier.SSD, loc, record.checksum)
            self._entries[record.key] = entry
            state.lru[record.key] = entry
        if state.lru:
            log.info(
                "kvstore.ssd_reindexed", num_blocks=len(state.lru), dir=str(state.backend.root)
            )

    def _tier_state(self, tier: Tier) -> _TierState | None:
        return next((t for t in self._tiers if t.tier == tier), None)

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return tuple(t.tier for t in self._tiers)

    # ---- writing ----

    def open_put(
        self, *, skip_existing: bool = False, trace_context: Mapping[str, str] | None = None
    ) -> PutSession:
        return PutSession(self, skip_existing=skip_existing, trace_context=trace_context)

    def put(self, key: bytes, data) -> Tier:
        """Store one whole block (a convenience over write_piece + seal)."""
        key = block_key(key)
        self.write_piece(key, 0, data)
        return self.seal(key, checksum(data))

    def contains(self, key: bytes) -> bool:
        return key in self._entries

    def write_piece(self, key: BlockKey, offset: int, data) -> None:
        """Copy ``data`` into the block's staging slot at ``offset`` (and hash it on the way
        when it continues the bytes hashed so far)."""
        with self._cond:
            staged = self._stage(key)
            try:
                staged.tracker.add(offset, len(data))
            except Exception:
                if not staged.tracker.ranges:
                    self._drop_staged(staged)
                raise
            staged.writers += 1
            in_order = staged.hashed_bytes == offset and not staged.hashing
            staged.hashing |= in_order
        done = False
        try:
            hasher = staged.hasher if in_order else None
            self._staging_pool.write(staged.slot, data, offset, hasher)
            done = True
        finally:
            with self._cond:
                staged.writers -= 1
                staged.touched_at = self._clock()
                if in_order:
                    staged.hashing = False
                    staged.hashed_bytes = offset + len(data) if done else -1

    def reserve_shared(
        self, keys: Sequence[bytes], *, skip_existing: bool = False
    ) -> list[int | None]:
        """Staging slots a same-host writer fills through shared memory, then seals.

        Returns each key's byte offset in the segment, or None for a key skipped because it
        is already stored.
        """
        if self.segment is None:
            raise InvalidBlockError("shared memory is disabled on this kvstore")
        offsets: list[int | None] = []
        for raw in keys:
            key = block_key(raw)
            with self._cond:
                if skip_existing and key in self._entries:
                    offsets.append(None)
                    continue
                staged = self._stage(key)
                if staged.tracker.ranges:
                    raise ChunkOrderError(f"block {key.hex()} is already being written")
                staged.tracker.fill()
            offsets.append(self._staging_pool.offset(staged.slot))
        return offsets

    def _stage(self, key: BlockKey) -> _Staged:
        """The staging record of ``key``, created on its first piece. Caller holds the lock."""
        if self._closed:
            raise StoreClosedError("the kvstore is shutting down")
        if key in self._entries:
            raise BlockExistsError(
                f"block {key.hex()} is already stored (blocks are immutable; skip keys that "
                "Lookup reports, or set skip_existing)"
            )
        staged = self._staging.get(key)
        if staged is not None:
            if staged.sealing:
                raise BlockExistsError(f"block {key.hex()} is being stored by another writer")
            return staged
        if self._num_staging_slots() >= self.settings.staging_blocks:
            now = self._clock()
            self._expire_leases(now)
            self._expire_staging(now)
        slot = None
        if self._num_staging_slots() < self.settings.staging_blocks:
            slot = self._staging_pool.allocate()
        if slot is None:
            raise CapacityError(
                f"all {self.settings.staging_blocks} staging slots hold unsealed blocks; "
                "seal blocks before starting more, or raise staging_blocks"
            )
        staged = _Staged(key, slot, PieceTracker.empty(key, self.block_size_bytes), self._clock())
        self._staging[key] = staged
        return staged

    def seal(self, key: BlockKey, expected_checksum: int, *, verify: bool = True) -> Tier:
        """Verify the staged block and store it; returns the tier it landed in.

        ``verify=False`` (SealShared): a same-host writer hashed the slot's bytes itself, as
        it copied them there, so re-reading them here would only cost a pass over memory
        that its next copy needs; a wrong checksum cannot reach a caller anyway, since every
        read verifies (a mismatch is a miss and drops the block).
        """
        with self._cond:
            staged = self._staging.get(key)
            if staged is None:
                if key in self._entries:
                    raise BlockExistsError(f"block {key.hex()} is already stored")
                raise ChunkOrderError(f"seal of block {key.hex()} before any of its bytes")
            if staged.sealing:
                raise ChunkOrderError(f"block {key.hex()} sealed twice")
            if not staged.tracker.complete or staged.writers:
                raise InvalidBlockError(
                    f"seal of block {key.hex()} after {staged.tracker.num_received_bytes} bytes; "
                    f"this store's block size is {self.block_size_bytes} bytes"
                )
            staged.sealing = True
        data = self._staging_pool.view(staged.slot)
        if not verify:
            actual = expected_checksum
        elif staged.hashed_bytes == self.block_size_bytes:
            actual = staged.hasher.intdigest()  # hashed as its pieces were copied in
        else:
            actual = checksum(data)
        if actual != expected_checksum:
            with self._cond:
                self._drop_staged(staged)
            raise ChecksumMismatchError(
                f"block {key.hex()}: checksum of the bytes received is {actual:#018x}, "
                f"the writer sent {expected_checksum:#018x}"
            )
        try:
            return self._commit(staged, data, actual)
        finally:
            with self._cond:
                self._drop_staged(staged)

    def discard_staged(self, keys: Sequence[BlockKey]) -> int:
        """Drop the unsealed blocks among ``keys`` (a seal under way wins); how many."""
        num_dropped = 0
        with self._cond:
            for key in keys:
                staged = self._staging.get(key)
                if staged is not None and not staged.sealing and not staged.writers:
                    self._drop_staged(staged)
                    num_dropped += 1
        return num_dropped

    def _num_staging_slots(self) -> int:
        return len(self._staging) + self._num_held_slots

    def _drop_staged(self, staged: _Staged) -> None:
        """Forget a staged block; its slot waits for the leases that hold it. Caller holds
        the lock."""
        if self._staging.get(staged.key) is staged:
            del self._staging[staged.key]
            staged.dropped = True
            if staged.adopted:
                return
            if staged.leases:
                self._num_held_slots += 1
            else:
                self._staging_pool.free(staged.slot)

    def _unhold(self, staged: _Staged, lease_id: str) -> None:
        """A lease on a staged block ended. Caller holds the lock."""
        staged.leases.discard(lease_id)
        if staged.dropped and not staged.adopted and not staged.leases:
            self._num_held_slots -= 1
            self._staging_pool.free(staged.slot)

    def _commit(self, staged: _Staged, data, block_checksum: int) -> Tier:
        with self._cond:
            plan = None
            for index, state in enumerate(self._tiers):
                in_place = state.backend is self._staging_pool
                plan = self._plan_room(index, adopt=staged.slot if in_place else None)
                if plan is not None:
                    break
            if plan is None:
                raise CapacityError("every tier is full of pinned blocks; unpin or add capacity")
            dst, loc, moves, freed = plan
        self._run_moves(moves)
        if dst.backend is self._staging_pool and loc == staged.slot:
            with self._cond:
                staged.adopted = True  # the bytes are where they belong: no copy
                if freed is not None:  # the victim's slot, which nobody took over
                    self._staging_pool.free(freed)
        else:
            try:
                dst.write(loc, staged.key, data, block_checksum)
            except OSError:
                with self._cond:
                    dst.give(loc)
                raise
        with self._cond:
            entry = _Entry(staged.key, dst.tier, loc, block_checksum)
            if staged.adopted:  # its readers' offsets are the entry's now: pin the entry
                entry.leases.update(staged.leases)
                for lease_id in staged.leases:
                    self._leases[lease_id].keys.add(staged.key)
            self._entries[staged.key] = entry
            dst.lru[staged.key] = entry
            self._emit(EventOp.STORED, staged.key, dst.tier, None)
        return dst.tier

    # ---- moving between tiers ----

    def _plan_room(
        self, index: int, spare: _Spare | None = None, adopt: int | None = None
    ) -> tuple[_TierState, int, list[_Move], int | None] | None:
        """Reserve a location in tier ``index``, demoting LRU victims down the chain.

        ``spare`` is a location the caller is vacating and may hand on; ``adopt`` a staging
        slot of this tier's slab the new block keeps (commit in place).
        Returns (tier, loc, moves, freed) with moves ordered top-down and ``freed`` the
        victim's slot when an adopted slot replaces it (the caller frees it after the moves),
        or None when the tier is full of blocks that may not move. Caller holds the lock.
        """
        top = self._tiers[index]
        if adopt is not None and top.adopt():
            return top, adopt, [], None
        loc = self._take(index, spare) if adopt is None else None
        if loc is not None:
            return top, loc, [], None
        victim = self._pick_victim(top)
        if victim is None:
            return None
        moves: list[_Move] = []
        first_loc = victim.loc
        level = index
        while True:
            victim.moving = True
            below = level + 1
            if below == len(self._tiers):
                moves.append(_Move(victim, None, 0))
                break
            lower = self._tiers[below]
            dst_loc = self._take(below, spare)
            if dst_loc is not None:
                moves.append(_Move(victim, lower, dst_loc))
                break
            next_victim = self._pick_victim(lower)
            if next_victim is None:  # the lower tier is all pinned: drop this victim instead
                moves.append(_Move(victim, None, 0))
                break
            moves.append(_Move(victim, lower, next_victim.loc))
            victim, level = next_victim, below
        if adopt is not None:
            return top, adopt, moves, first_loc
        return top, first_loc, moves, None

    def _take(self, index: int, spare: _Spare | None) -> int | None:
        if spare is not None and spare.index == index and not spare.used:
            spare.used = True
            return spare.loc
        return self._tiers[index].take()

    def _pick_victim(self, state: _TierState) -> _Entry | None:
        now = self._clock()
        for entry in state.lru.values():
            if not entry.moving and not entry.readers and not self._is_pinned(entry, now):
                return entry
        return None

    def _run_moves(self, moves: list[_Move]) -> None:
        """Carry out planned moves bottom-up, so each destination is free when written."""
        for move in reversed(moves):
            entry = move.entry
            src = self._tier_state(entry.tier)
            if move.dst is not None:
                try:
                    move.dst.write(move.dst_loc, entry.key, src.read(entry), entry.checksum)
                except (OSError, CorruptFileError) as exc:
                    log.warning("kvstore.demote_failed", key=entry.key.hex(), error=str(exc))
                    with self._cond:
                        move.dst.give(move.dst_loc)
                    move = _Move(entry, None, 0)
            with self._cond:
                del src.lru[entry.key]
                src.num_evicted += 1
                if move.dst is None:
                    metrics.KV_EVICTIONS.labels(src.tier.label).inc()
                    del self._entries[entry.key]
                    if not src.is_slab:
                        src.backend.discard(entry.key)
                    self._emit(EventOp.EVICTED, entry.key, None, src.tier)
                else:
                    entry.tier, entry.loc = move.dst.tier, move.dst_loc
                    move.dst.lru[entry.key] = entry
                    move.dst.num_demoted_in += 1
                    metrics.KV_DEMOTIONS.labels(src.tier.label).inc()
                    self._emit(EventOp.DEMOTED, entry.key, move.dst.tier, src.tier)
                entry.moving = False
                self._cond.notify_all()

    def _promote(self, entry: _Entry, data) -> None:
        """Move a block that was just read from a lower tier one tier up (best effort)."""
        with self._cond:
            index = next(i for i, t in enumerate(self._tiers) if t.tier == entry.tier)
            if (
                index == 0
                or self._entries.get(entry.key) is not entry
                or entry.moving
                or entry.readers
                or self._is_pinned(entry, self._clock())
            ):
                return
            entry.moving = True
            spare = _Spare(index, entry.loc)
            plan = self._plan_room(index - 1, spare)
            if plan is None:
                entry.moving = False
                self._cond.notify_all()
                return
            dst, loc, moves, _ = plan
        self._run_moves(moves)
        dst.write(loc, entry.key, data, entry.checksum)
        with self._cond:
            src = self._tier_state(entry.tier)
            del src.lru[entry.key]
            if not spare.used:
                src.give(entry.loc)
            if not src.is_slab:
                src.backend.discard(entry.key)
            entry.tier, entry.loc = dst.tier, loc
            dst.lru[entry.key] = entry
            dst.num_promoted_in += 1
            metrics.KV_PROMOTIONS.labels(src.tier.label).inc()
            self._emit(EventOp.PROMOTED, entry.key, dst.tier, src.tier)
            entry.moving = False
            self._cond.notify_all()

    # ---- reading ----

    @contextlib.contextmanager
    def _reading(self, key: bytes) -> Iterator[tuple[_Entry, object] | None]:
        """Hold a read reference on ``key`` and yield (entry, raw bytes) or None."""
        with self._cond:
            entry = self._entries.get(key)
            while entry is not None and entry.moving:
                self._cond.wait()
                entry = self._entries.get(key)
            if entry is None or entry.corrupt:
                self.num_misses += 1
                entry = None
            else:
                entry.readers += 1
                self._tier_state(entry.tier).lru.move_to_end(key)
        if entry is None:
            yield None
            return
        try:
            try:
                raw = self._tier_state(entry.tier).read(entry)
            except FileNotFoundError:
                raw = None
            except CorruptFileError:
                entry.corrupt = True
                raw = None
            yield (entry, raw) if raw is not None else None
        finally:
            with self._cond:
                entry.readers -= 1
                if entry.corrupt:
                    self._drop_corrupt(entry)

    def get(self, key: bytes) -> tuple[bytearray, Tier, int] | None:
        """A verified copy of the block, its tier and checksum; None for a miss."""
        with self._reading(key) as found:
            if found is None:
                return None
            entry, raw = found
            data = raw if isinstance(raw, bytearray) else bytearray(raw)
            tier = entry.tier
            if len(data) != self.block_size_bytes or checksum(data) != entry.checksum:
                entry.corrupt = True
        return self._finish_read(entry, data, tier)

    def get_chunks(
        self,
        key: bytes,
        chunk_bytes: int,
        encode: Callable[[int, memoryview, xxhash.xxh3_64], bytes] = _copy,
    ) -> tuple[list[bytes], Tier, int] | None:
        """The block as ``chunk_bytes`` pieces, verified, in one copy: ``encode(offset, piece,
        hasher)`` makes that copy (the gRPC server frames it straight from the slab) and feeds
        ``hasher`` the bytes it copied, which are what is verified."""
        with self._reading(key) as found:
            if found is None:
                return None
            entry, raw = found
            view, hasher = memoryview(raw), xxhash.xxh3_64()
            chunks = [
                encode(start, view[start : start + chunk_bytes], hasher)
                for start in range(0, len(view), chunk_bytes)
            ]
            tier = entry.tier
            if len(view) != self.block_size_bytes or hasher.intdigest() != entry.checksum:
                entry.corrupt = True
            owned = raw if isinstance(raw, bytearray) else None
            if tier != self._tiers[0].tier and owned is None:
                owned = bytes(view)  # promotion needs a copy that outlives the read
        if self._finish_read(entry, owned, tier) is None:
            return None
        return chunks, tier, entry.checksum

    def _finish_read(self, entry: _Entry, data, tier: Tier):
        if entry.corrupt:
            with self._cond:
                self.num_corrupt += 1
                self.num_misses += 1
            log.warning("kvstore.corrupt_block", key=entry.key.hex(), tier=tier.label)
            return None
        with self._cond:
            self.num_hits += 1
        if tier != self._tiers[0].tier:
            self._promote(entry, data)
        return data, tier, entry.checksum

    def _drop_corrupt(self, entry: _Entry) -> None:
        """Remove a block that failed its check once nobody reads it. Caller holds the lock."""
        if entry.readers or entry.moving or self._entries.get(entry.key) is not entry:
            return
        self._remove(entry, EventOp.DELETED)

    def _remove(self, entry: _Entry, op: EventOp) -> None:
        state = self._tier_state(entry.tier)
        del self._entries[entry.key]
        del state.lru[entry.key]
        state.give(entry.loc)
        if not state.is_slab:
            state.backend.discard(entry.key)
        for lease_id in entry.leases:
            lease = self._leases.get(lease_id)
            if lease is not None:
                lease.keys.discard(entry.key)
        self._emit(op, entry.key, None, state.tier)

    def map_shared(
        self, keys: Sequence[bytes], ttl_s: float | None, *, include_staged: bool = False
    ) -> tuple[str, list[Mapped | None]]:
        """Pin blocks in the shared DRAM pool under a new lease; per key where it lies, or
        None (a miss).

        A block in a lower tier is read (and so promoted) first; one that cannot be placed
        in DRAM is a miss here, and the reader falls back to Get. With ``include_staged`` a
        block still being written is pinned in its staging slot (see the module's invariants)
        and counts as a hit.
        """
        if self.segment is None:
            raise InvalidBlockError("shared memory is disabled on this kvstore")
        lease_id = self.pin([], ttl_s, None).lease_id
        return lease_id, [self._map_one(block_key(k), lease_id, include_staged) for k in keys]

    def _map_one(self, key: BlockKey, lease_id: str, include_staged: bool) -> Mapped | None:
        lower = key in self._entries and self._entries[key].tier != Tier.DRAM
        if lower:
            self.get(key)  # counts the hit or the miss
        with self._cond:
            lease = self._leases.get(lease_id)
            entry = self._entries.get(key)
            staged = self._staging.get(key) if include_staged and entry is None else None
            if lease is None:  # expired while a lower tier was read: map nothing more
                return None
            if staged is not None:
                self.num_hits += 1
                return Mapped(self._hold_staged(staged, lease_id, lease), 0, Tier.DRAM, True)
            if not self._in_dram(entry):
                if not lower:
                    self.num_misses += 1
                return None
            if not lower:
                self.num_hits += 1
            offset = self._hold_entry(entry, lease_id, lease)
            return Mapped(offset, entry.checksum, entry.tier, False)

    def _in_dram(self, entry: _Entry | None) -> bool:
        """Whether a shared-memory reader may pin ``entry`` where it lies. Caller holds the lock."""
        return (
            entry is not None and entry.tier == Tier.DRAM and not entry.moving and not entry.corrupt
        )

    def _hold_staged(self, staged: _Staged, lease_id: str, lease: _LeaseState) -> int:
        """Pin a staged block's slot under ``lease``; its offset. Caller holds the lock."""
        staged.leases.add(lease_id)
        lease.staged.append(staged)
        return self._staging_pool.offset(staged.slot)

    def _hold_entry(self, entry: _Entry, lease_id: str, lease: _LeaseState) -> int:
        """Pin a DRAM block under ``lease`` (a use: LRU); its offset. Caller holds the lock."""
        dram = self._tier_state(Tier.DRAM)
        entry.leases.add(lease_id)
        lease.keys.add(entry.key)
        dram.lru.move_to_end(entry.key)
        return dram.backend.offset(entry.loc)

    @contextlib.contextmanager
    def reading_ranges(
        self, ranges: Sequence[tuple[bytes, int, int]], ttl_s: float | None = None
    ) -> Iterator[tuple[str, list[tuple[memoryview, Tier, int] | None]]]:
        """Bytes ``[offset, offset + length)`` of staged or stored blocks (GetStaged), pinned
        under a lease that ends when the block exits, whatever ends it: yields (lease id, per
        range (view, tier, checksum) or None). The views are unverified (a staged block has no
        checksum yet; ``checksum`` is the stored block's, 0 while staged) and valid only
        inside the block. A block stored outside the slab (SSD, HBM) is read as a verified
        copy. Each block counts one hit or miss, however many of its ranges are read."""
        for raw, offset, length in ranges:
            if offset < 0 or length < 0 or offset + length > self.block_size_bytes:
                raise InvalidBlockError(
                    f"bytes [{offset}, {offset + length}) of block {bytes(raw).hex()} run past "
                    f"the block size {self.block_size_bytes}"
                )
        lease_id = self.pin([], ttl_s, None).lease_id
        try:
            keys = dict.fromkeys(block_key(raw) for raw, _, _ in ranges)
            blocks = {key: self._read_held(key, lease_id) for key in keys}
            out = []
            for raw, offset, length in ranges:
                block = blocks[block_key(raw)]
                out.append(
                    None if block is None else (block[0][offset : offset + length], *block[1:])
                )
            yield lease_id, out
        finally:
            self.unpin(lease_id)

    def _read_held(self, key: BlockKey, lease_id: str) -> tuple[memoryview, Tier, int] | None:
        """The whole block's bytes, staged or stored, pinned under the lease when they lie in
        the slab; counts the hit or the miss."""
        size = self.block_size_bytes
        with self._cond:
            lease = self._leases.get(lease_id)
            entry = self._entries.get(key)
            staged = self._staging.get(key) if entry is None else None
            if lease is not None and staged is not None:
                self.num_hits += 1
                start = self._hold_staged(staged, lease_id, lease)
                return self._buffer[start : start + size], Tier.DRAM, 0
            if lease is not None and self._in_dram(entry):
                self.num_hits += 1
                start = self._hold_entry(entry, lease_id, lease)
                return self._buffer[start : start + size], entry.tier, entry.checksum
            if entry is None:
                self.num_misses += 1
                return None
        found = self.get(key)  # another tier, or moving: a verified copy; counts hit or miss
        return None if found is None else (memoryview(found[0]), found[1], found[2])

    # ---- queries ----

    def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        tiers: list[Tier | None] = []
        with self._cond:
            for raw in keys:
                entry = self._entries.get(block_key(raw))
                tiers.append(entry.tier if entry is not None and not entry.corrupt else None)
        prefix = next((i for i, t in enumerate(tiers) if t is None), len(tiers))
        return LookupResult(tuple(tiers), prefix)

    def inventory(self) -> tuple[int, dict[BlockKey, Tier]]:
        """(last event seq, key -> tier) of every stored block, taken atomically."""
        with self._cond:
            return self._seq, {k: e.tier for k, e in self._entries.items()}

    def stats(self) -> StoreStats:
        with self._cond:
            now = self._clock()
            tiers = tuple(
                TierStats(
                    tier=t.tier,
                    capacity_bytes=t.capacity_blocks * self.block_size_bytes,
                    used_bytes=len(t.lru) * self.block_size_bytes,
                    num_blocks=len(t.lru),
                    num_evicted=t.num_evicted,
                    num_promoted_in=t.num_promoted_in,
                    num_demoted_in=t.num_demoted_in,
                )
                for t in self._tiers
            )
            pinned = sum(1 for e in self._entries.values() if e.leases and self._is_pinned(e, now))
            return StoreStats(
                node_id=self.settings.node_id,
                block_size_bytes=self.block_size_bytes,
                tiers=tiers,
                num_pinned_blocks=pinned,
                num_staging_blocks=len(self._staging),
                num_hits=self.num_hits,
                num_misses=self.num_misses,
                num_corrupt=self.num_corrupt,
                num_leases=len(self._leases),
            )

    # ---- leases, deletion ----

    def pin(self, keys: Sequence[bytes], ttl_s: float | None, lease_id: str | None) -> Lease:
        s = self.settings
        ttl_s = min(ttl_s if ttl_s else s.default_lease_ms / 1000, s.max_lease_ms / 1000)
        pinned, missing = [], []
        with self._cond:
            now = self._clock()
            if lease_id:
                lease = self._leases.get(lease_id)
                if lease is None or lease.expires_at <= now:
                    raise LeaseNotFoundError(f"lease {lease_id!r} is unknown or expired")
            else:
                lease_id, lease = uuid.uuid4().hex, _LeaseState(0.0, set())
                self._leases[lease_id] = lease
            lease.expires_at = now + ttl_s
            for raw in keys:
                key = block_key(raw)
                entry = self._entries.get(key)
                while entry is not None and entry.moving:
                    self._cond.wait()
                    entry = self._entries.get(key)
                if entry is None or entry.corrupt:
                    missing.append(key)
                    continue
                entry.leases.add(lease_id)
                lease.keys.add(key)
                pinned.append(key)
        expires_ms = int((time.time() + ttl_s) * 1000)
        return Lease(lease_id, tuple(pinned), tuple(missing), expires_ms)

    def unpin(self, lease_id: str) -> int:
        """Release a lease; 0 when it is unknown (already released or expired)."""
        with self._cond:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                return 0
            return self._release_lease(lease_id, lease)

    def _release_lease(self, lease_id: str, lease: _LeaseState) -> int:
        for key in lease.keys:
            entry = self._entries.get(key)
            if entry is not None:
                entry.leases.discard(lease_id)
        for staged in lease.staged:
            self._unhold(staged, lease_id)
        return len(lease.keys | {s.key for s in lease.staged})

    def _is_pinned(self, entry: _Entry, now: float) -> bool:
        for lease_id in list(entry.leases):
            lease = self._leases.get(lease_id)
            if lease is not None and lease.expires_at > now:
                return True
            entry.leases.discard(lease_id)
        return False

    def expire(self) -> None:
        """Drop expired leases and abandoned staging blocks (called periodically)."""
        now = self._clock()
        with self._cond:
            self._expire_leases(now)
            self._expire_staging(now)

    def _expire_leases(self, now: float) -> None:
        for lease_id, lease in list(self._leases.items()):
            if lease.expires_at <= now:
                del self._leases[lease_id]
                self._release_lease(lease_id, lease)

    def _expire_staging(self, now: float) -> None:
        timeout = self.settings.staging_timeout_s
        for staged in list(self._staging.values()):
            if not staged.sealing and not staged.writers and now - staged.touched_at > timeout:
                log.info("kvstore.staging_expired", key=staged.key.hex())
                self._drop_staged(staged)

    def delete(self, keys: Sequence[bytes]) -> DeleteResult:
        deleted, busy = 0, []
        with self._cond:
            now = self._clock()
            for raw in keys:
                key = block_key(raw)
                entry = self._entries.get(key)
                if entry is None:
                    continue
                if entry.moving or entry.readers or self._is_pinned(entry, now):
                    busy.append(key)
                    continue
                self._remove(entry, EventOp.DELETED)
                deleted += 1
        return DeleteResult(deleted, tuple(busy))

    # ---- events, shutdown ----

    def _emit(self, op: EventOp, key: BlockKey, tier: Tier | None, from_tier: Tier | None) -> None:
        self._seq += 1
        self._on_event(KVEvent(self._seq, op, key, tier, from_tier))

    def set_event_sink(self, sink: EventSink) -> None:
        with self._cond:
            self._on_event = sink

    def close(self) -> None:
        """Stop accepting writes, report volatile blocks as evicted, free shared memory."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            for state in self._tiers:
                if state.tier == Tier.SSD:
                    continue
                for entry in list(state.lru.values()):
                    del self._entries[entry.key]
                    self._emit(EventOp.EVICTED, entry.key, None, state.tier)
                state.lru.clear()
        if self.segment is not None:
            self.segment.close()

    @property
    def shm_path(self) -> Path | None:
        return self.segment.path if self.segment else None


class PutSession:
    """One Put stream: chunks and seals in protocol order; see kvstore.proto ``Put``.

    Blocks sealed here stay stored whatever happens later; ``abort`` drops the unsealed
    blocks this session wrote to. Unsealed blocks survive ``finish`` so a block's pieces
    may span several streams (they expire after ``staging_timeout_s``).
    """

    def __init__(self, store: TieredStore, *, skip_existing: bool, trace_context) -> None:
        self._store = store
        self.skip_existing = skip_existing
        self.trace_context = dict(trace_context or {})
        self._touched: set[BlockKey] = set()
        self._sealed: set[BlockKey] = set()
        self._skipped: set[BlockKey] = set()
        self._tiers: list[Tier] = []

    def chunk(self, key: bytes, offset: int, data) -> None:
        key = block_key(key)
        if key in self._sealed:
            raise ChunkOrderError(f"chunk for block {key.hex()} after its seal")
        if key in self._skipped:
            return
        if self.skip_existing and self._store.contains(key) and key not in self._touched:
            self._skipped.add(key)
            return
        self._store.write_piece(key, offset, data)
        self._touched.add(key)

    def seal(self, key: bytes, block_checksum: int, *, verify: bool = True) -> None:
        key = block_key(key)
        if key in self._sealed:
            raise ChunkOrderError(f"block {key.hex()} sealed twice")
        if key in self._skipped or (self.skip_existing and self._store.contains(key)):
            self._skipped.add(key)
            return
        self._tiers.append(self._store.seal(key, block_checksum, verify=verify))
        self._sealed.add(key)
        self._touched.discard(key)

    def finish(self) -> PutResult:
        return PutResult(len(self._sealed), len(self._skipped), tuple(self._tiers))

    def abort(self) -> None:
        self._store.discard_staged(list(self._touched))
        self._touched.clear()


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    if not torch.cuda.is_available():
        log.warning(
            "kvstore.no_cuda", detail="hbm_capacity_bytes is set but CUDA is absent; no HBM tier"
        )
        return False
    return True
