"""Pulling a followed prefill's KV layer group by layer group (the overlapped handoff).

The prefill worker announces, in ``Prefill.Handoff``, each group of layers it has written into
its kvstore's staging slots (:class:`StagedLayers`); on the same host this worker copies those
layers into the blocks it reserved for the request while the prefill computes the next layers
(``LLMEngine.load_layers``: one copy per group and run of consecutive blocks). The bytes of an
unsealed slot are vouched for by nothing but the checksum: each block's copied layers are
hashed in order, and the block counts as loaded only when that hash equals the checksum sent
with its last group. Blocks
that never get there (a slot reused, a group missed, another host) are pulled whole after
their seal, as before, or recomputed.

Invariants: a block's layers are copied in order from layer 0 (a group that does not start
where the block stands is skipped, so the hash covers exactly the bytes written); a block is
``ready`` once, and only with a matching checksum or a verified whole-block fetch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import xxhash

ReadRange = Callable[[int, int], memoryview]  # (segment offset, bytes) -> read-only view
LoadLayers = Callable[[range, int, bytearray], None]  # (layers, first block index, bytes)


@dataclass(frozen=True)
class StagedLayers:
    """Layers ``[layer_start, layer_end)`` of these blocks are in their staging slots."""

    keys: tuple[bytes, ...]
    slot_offsets: tuple[int, ...]
    layer_start: int
    layer_end: int
    layer_nbytes: int
    checksums: tuple[int, ...] = ()  # with the last layer: xxh3-64 of each whole block


class LayerPull:
    """Which of a request's reserved blocks hold verified KV, and how far each has come."""

    def __init__(self, keys: Sequence[bytes], num_layers: int, layer_nbytes: int) -> None:
        self._index = {key: i for i, key in enumerate(keys)}
        self._num_layers = num_layers
        self._layer_nbytes = layer_nbytes
        self._next_layer = [0] * len(keys)
        self._hashers = [xxhash.xxh3_64() for _ in keys]
        self.ready = [False] * len(keys)
        self.num_bytes = 0  # copied from staging slots

    def add(self, group: StagedLayers, read: ReadRange, load_layers: LoadLayers) -> int:
        """Copy the group's layers of the blocks that stand at its first layer into their
        reserved blocks; returns how many blocks it completed and verified."""
        if group.layer_nbytes != self._layer_nbytes or group.layer_end > self._num_layers:
            return 0  # another model's layout: never load it
        checksums = dict(zip(group.keys, group.checksums, strict=False))
        todo = [
            (i, offset, checksums.get(key))
            for key, offset in zip(group.keys, group.slot_offsets, strict=True)
            if (i := self._index.get(key)) is not None
            and not self.ready[i]
            and self._next_layer[i] == group.layer_start
        ]
        for run in _runs(todo):
            self._copy(run, group, read, load_layers)
        num_done = 0
        for i, _, block_checksum in todo:
            self._next_layer[i] = group.layer_end
            if group.layer_end == self._num_layers and block_checksum is not None:
                self.ready[i] = self._hashers[i].intdigest() == block_checksum
                num_done += self.ready[i]
        return num_done

    def _copy(self, run, group: StagedLayers, read: ReadRange, load_layers: LoadLayers) -> None:
        """The group's layers of one run of consecutive blocks: each block's slice (its layers
        are contiguous in its slot) copied into one buffer and hashed there, then loaded in
        one call (the hash is of the very bytes loaded, not of the slot, which a writer might
        still touch)."""
        layers = range(group.layer_start, group.layer_end)
        size = len(layers) * self._layer_nbytes
        data = bytearray(size * len(run))
        view = memoryview(data)
        for j, (i, offset, _) in enumerate(run):
            piece = view[j * size : (j + 1) * size]
            piece[:] = read(offset + group.layer_start * self._layer_nbytes, size)
            self._hashers[i].update(piece)
        load_layers(layers, run[0][0], data)
        self.num_bytes += len(data)

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


def _runs(todo: list[tuple]) -> list[list[tuple]]:
    """Split (block index, ...) tuples into runs of consecutive block indices."""
    runs: list[list[tuple]] = []
    for item in sorted(todo):
        if runs and runs[-1][-1][0] + 1 == item[0]:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs
