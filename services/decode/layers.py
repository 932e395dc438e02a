"""Pulling a followed prefill's KV layer group by layer group (the overlapped handoff).

The prefill worker announces, in ``Prefill.Handoff``, each group of layers it has written into
its kvstore's staging slots (:class:`StagedLayers`); this worker copies those layers into the
blocks it reserved for the request while the prefill computes the next layers
(``LLMEngine.load_layers``: one copy per block and group). The reads are the kvstore's like any
other (:class:`StagedReads`): on the same host straight out of its shared segment, the blocks
pinned when their first layers arrive (the store counts the hit and keeps the slot for this
reader even if the prefill gives it up) and released as soon as they are done; from another
host one GetStaged call per group, which holds its own lease for the call. The bytes of an
unsealed slot are vouched for by the checksum alone: each block's copied layers are hashed in
order, and the block counts as loaded only when that hash equals the checksum sent with its
last group. Blocks that never get there (a group missed, a slot the store does not place where
the prefill wrote, a failed read) are pulled whole after their seal, as before, or recomputed.

Invariants: a block's layers are copied in order from layer 0 (a block that misses a group is
done with, so the hash covers exactly the bytes loaded); a block is ``ready`` once, and only
with a matching checksum or a verified whole-block fetch; every block held is released once,
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

    @property
    def offset(self) -> int:
        """Where the group's layers start in a block."""
        return self.layer_start * self.layer_nbytes

    @property
    def nbytes(self) -> int:
        """The group's bytes of one block."""
        return (self.layer_end - self.layer_start) * self.layer_nbytes


class StagedReads(Protocol):
    """The kvstore a request's layer pulls read from: its shared segment on the same host
    (``staged.StagedPins``), GetStaged from another (``staged.StagedRanges``)."""

    def pin(self, keys: Sequence[bytes]) -> list[bool]:
        """Hold these blocks for this request from their first layers on; whether each one is
        held (False: the store has no such block; it is never read or released)."""

    def read(self, group: StagedLayers, picked: Sequence[int]) -> list[memoryview | None]:
        """The group's layers of its blocks ``group.keys[j]`` for ``j`` in ``picked`` (held),
        ``len(layers) * layer_nbytes`` bytes each, valid until the next call; None for a
        block that cannot be read where the prefill wrote it."""

    def release(self, keys: Sequence[bytes], verified: Sequence[bool]) -> None:
        """These held blocks are done with (``verified``: each one loaded and verified)."""

    def close(self) -> None:
        """Give back whatever is still held (the follow ended, however it ended)."""


class LayerPull:
    """Which of a request's reserved blocks hold verified KV, and how far each has come."""

    def __init__(self, keys: Sequence[bytes], num_layers: int, layer_nbytes: int) -> None:
        self._keys = list(keys)
        self._index = {key: i for i, key in enumerate(keys)}
        self._num_layers = num_layers
        self._layer_nbytes = layer_nbytes
        self._next_layer = [0] * len(keys)
        self._hashers = [xxhash.xxh3_64() for _ in keys]
        self._held = [False] * len(keys)  # pinned by the reads, not yet released
        self._done = [False] * len(keys)  # pulled to the end, or given up
        self.ready = [False] * len(keys)
        self.num_bytes = 0  # copied from staging slots

    def add(self, group: StagedLayers, reads: StagedReads, load_layers: LoadLayers) -> int:
        """Copy the group's layers of the blocks that stand at its first layer into their
        reserved blocks; returns how many blocks it completed and verified."""
        if group.layer_nbytes != self._layer_nbytes or group.layer_end > self._num_layers:
            return 0  # another model's layout: never load it
        todo = [
            (j, i)
            for j, key in enumerate(group.keys)
            if (i := self._index.get(key)) is not None and not self._done[i]
        ]
        if group.layer_start == 0:  # a block is pinned when its first layers arrive
            fresh = [i for _, i in todo if not self._held[i] and self._next_layer[i] == 0]
            if fresh:
                held = reads.pin([self._keys[i] for i in fresh])
                for i, ok in zip(fresh, held, strict=True):
                    self._held[i] = ok
        finished: list[int] = []
        picked: list[tuple[int, int]] = []
        for j, i in todo:
            if self._held[i] and self._next_layer[i] == group.layer_start:
                picked.append((j, i))
                continue
            self._done[i] = True  # not held, or a group missed
            if self._held[i]:
                finished.append(i)
        pieces = reads.read(group, [j for j, _ in picked]) if picked else []
        num_done = 0
        for (j, i), piece in zip(picked, pieces, strict=True):
            if piece is None:  # not where the prefill wrote it
                self._done[i] = True
                finished.append(i)
                continue
            self._load(i, group, piece, load_layers)
            if group.layer_end == self._num_layers:
                self._done[i] = True
                checksum = group.checksums[j] if j < len(group.checksums) else None
                self.ready[i] = self._hashers[i].intdigest() == checksum
                num_done += self.ready[i]
                finished.append(i)
        self._release(reads, finished)
        return num_done

    def _load(self, i: int, group: StagedLayers, piece: memoryview, load_layers) -> None:
        """The group's layers of one block: hashed while they are in cache, then loaded from
        the same bytes."""
        self._hashers[i].update(piece)
        load_layers(range(group.layer_start, group.layer_end), i, piece)
        self._next_layer[i] = group.layer_end
        self.num_bytes += len(piece)

    def _release(self, reads: StagedReads, finished: list[int]) -> None:
        if not finished:
            return
        for i in finished:
            self._held[i] = False
        reads.release([self._keys[i] for i in finished], [self.ready[i] for i in finished])

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
