"""Pulling a followed prefill's KV layer group by layer group (the overlapped handoff).

The prefill worker announces, in ``Prefill.Handoff``, each group of layers it has written into
its kvstore's staging slots (:class:`StagedLayers`); on the same host this worker copies those
layers into the blocks it reserved for the request while the prefill computes the next layers
(``LLMEngine.load_layers``: straight from the kvstore's segment into the pool, one copy per
block and group). The reads are the kvstore's like any other: when a block's first layers
arrive it is pinned through :class:`StagedReads` (the store counts the hit and keeps the slot
for this reader even if the prefill gives it up), and it is released as soon as it is done.
The bytes of an unsealed slot are vouched for by the checksum alone: each block's copied layers
are hashed in order, and the block counts as loaded only when that hash equals the checksum
sent with its last group. Blocks that never get there (a group missed, a slot the store does
not place where the prefill wrote, another host) are pulled whole after their seal, as
before, or recomputed.

Invariants: a block's layers are copied in order from layer 0 (a block that misses a group is
done with, so the hash covers exactly the bytes loaded); a block is ``ready`` once, and only
with a matching checksum or a verified whole-block fetch; every block pinned is released once,
when it is done or by the caller's ``StagedReads.close`` on every other path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import xxhash

LoadLayers = Callable[[range, int, memoryview], None]  # (layers, block index, that block's bytes)


@dataclass(frozen=True)
class StagedLayers:
    """Layers ``[layer_start, layer_end)`` of these blocks are in their staging slots."""

    keys: tuple[bytes, ...]
    slot_offsets: tuple[int, ...]
    layer_start: int
    layer_end: int
    layer_nbytes: int
    checksums: tuple[int, ...] = ()  # with the last layer: xxh3-64 of each whole block


class StagedReads(Protocol):
    """The kvstore a request's layer pulls read from (same host)."""

    def pin(self, keys: Sequence[bytes]) -> list[int | None]:
        """Pin the blocks (staged or stored) for this request; each one's segment offset,
        None for a block the store does not hold."""

    def read(self, key: bytes, offset: int, num_bytes: int) -> memoryview:
        """Bytes of the segment, from a block pinned by :meth:`pin`."""

    def release(self, keys: Sequence[bytes], verified: Sequence[bool]) -> None:
        """These pinned blocks are done with (``verified``: each one loaded and verified)."""


class LayerPull:
    """Which of a request's reserved blocks hold verified KV, and how far each has come."""

    def __init__(self, keys: Sequence[bytes], num_layers: int, layer_nbytes: int) -> None:
        self._index = {key: i for i, key in enumerate(keys)}
        self._num_layers = num_layers
        self._layer_nbytes = layer_nbytes
        self._next_layer = [0] * len(keys)
        self._hashers = [xxhash.xxh3_64() for _ in keys]
        self._offset: dict[int, int | None] = {}  # block -> where the store pinned it
        self._done = [False] * len(keys)  # pulled to the end, or given up
        self.ready = [False] * len(keys)
        self.num_bytes = 0  # copied from staging slots

    def add(self, group: StagedLayers, reads: StagedReads, load_layers: LoadLayers) -> int:
        """Copy the group's layers of the blocks that stand at its first layer into their
        reserved blocks; returns how many blocks it completed and verified."""
        if group.layer_nbytes != self._layer_nbytes or group.layer_end > self._num_layers:
            return 0  # another model's layout: never load it
        todo = [
            (i, key, announced)
            for key, announced in zip(group.keys, group.slot_offsets, strict=True)
            if (i := self._index.get(key)) is not None and not self._done[i]
        ]
        fresh = [(i, key) for i, key, _ in todo if i not in self._offset]
        if fresh and group.layer_start == 0:  # a block is pinned when its first layers arrive
            offsets = reads.pin([key for _, key in fresh])
            self._offset.update((i, o) for (i, _), o in zip(fresh, offsets, strict=True))
        checksums = dict(zip(group.keys, group.checksums, strict=False))
        finished: list[bytes] = []
        num_done = 0
        for i, key, announced in todo:
            pinned = i in self._offset
            if self._offset.get(i) != announced or self._next_layer[i] != group.layer_start:
                self._done[i] = True  # not where the prefill wrote it, or a group missed
                if pinned:
                    finished.append(key)
                continue
            self._copy(i, key, announced, group, reads, load_layers)
            if group.layer_end == self._num_layers:
                self._done[i] = True
                self.ready[i] = self._hashers[i].intdigest() == checksums.get(key)
                num_done += self.ready[i]
                finished.append(key)
        if finished:
            reads.release(finished, [self.ready[self._index[k]] for k in finished])
        return num_done

    def _copy(self, i: int, key: bytes, offset: int, group, reads, load_layers) -> None:
        """The group's layers of one block (contiguous in its slot): hashed while they are
        in cache, then loaded from the same bytes."""
        layers = range(group.layer_start, group.layer_end)
        size = len(layers) * self._layer_nbytes
        piece = reads.read(key, offset + group.layer_start * self._layer_nbytes, size)
        self._hashers[i].update(piece)
        load_layers(layers, i, piece)
        self._next_layer[i] = group.layer_end
        self.num_bytes += size

    def mark_ready(self, start: int, count: int) -> None:
        """Blocks ``[start, start + count)`` were fetched whole and verified."""
        for i in range(start, start + count):
            self.ready[i] = True

    def missing_runs(self, end: int) -> list[tuple[int, int]]:
        """``(start, stop)`` runs of blocks before ``end`` that are not ready."""
        runs, start = [], None
        for i in range(end):
            if not self.ready[i] and start is None:
                start = i
            elif self.ready[i] and start is not None:
                runs.append((start, i))
                start = None
        if start is not None:
            runs.append((start, end))
        return runs

    @property
    def num_ready_prefix(self) -> int:
        """Leading blocks that hold verified KV (what may be committed)."""
        n = 0
        while n < len(self.ready) and self.ready[n]:
            n += 1
        return n
