"""LayerPull: the decode side of the layer-group handoff, without a model or a kvstore. A
segment is a bytearray, blocks are 3 layers of 4 bytes, pins and loads are recorded."""

from __future__ import annotations

import pytest
import xxhash

from services.decode.layers import LayerPull, StagedLayers

LAYERS, NBYTES = 3, 4
BLOCK = LAYERS * NBYTES


class FakeStore:
    """StagedReads over a bytearray: key b"k<i>" sits in slot i unless ``moved`` says else."""

    def __init__(self, blocks: list[bytes], moved: dict[bytes, int | None] | None = None) -> None:
        self.segment = bytearray(b"".join(blocks))
        self.moved = moved or {}
        self.pinned: list[bytes] = []  # in pin order
        self.released: list[tuple[bytes, bool]] = []

    def pin(self, keys):
        self.pinned += keys
        return [self.moved.get(k, int(k[1:]) * BLOCK) for k in keys]

    def read(self, key, offset, n):
        assert key in self.pinned and key not in dict(self.released), "read outside a pin"
        return memoryview(self.segment)[offset : offset + n]

    def release(self, keys, verified):
        self.released += zip(keys, verified, strict=True)

    @property
    def held(self) -> set[bytes]:
        return set(self.pinned) - {k for k, _ in self.released}


def group(keys, start, end, checksums=()) -> StagedLayers:
    offsets = tuple(int(k[1:]) * BLOCK for k in keys)  # where the prefill wrote key b"k<i>"
    return StagedLayers(tuple(keys), offsets, start, end, NBYTES, tuple(checksums))


def recorder(loads: list):
    return lambda layers, start, data: loads.append((layers, start, bytes(data)))


def test_layers_in_groups_load_and_verify_each_block_under_one_pin():
    blocks = [bytes(range(i * BLOCK, (i + 1) * BLOCK)) for i in range(3)]
    keys = [b"k0", b"k1", b"k2"]
    store, pull, loads = FakeStore(blocks), LayerPull(keys, LAYERS, NBYTES), []
    assert pull.add(group(keys, 0, 2), store, recorder(loads)) == 0
    assert store.pinned == keys and store.held == set(keys)  # pinned at their first layers
    assert pull.num_ready_prefix == 0  # no checksum yet: nothing counts
    sums = [xxhash.xxh3_64_intdigest(b) for b in blocks]
    assert pull.add(group(keys, 2, 3, sums), store, recorder(loads)) == 3
    assert pull.ready == [True, True, True] and pull.num_ready_prefix == 3
    assert store.pinned == keys and store.released == [(k, True) for k in keys]
    assert [(layers, start) for layers, start, _ in loads] == [
        (range(0, 2), i) for i in range(3)
    ] + [(range(2, 3), i) for i in range(3)]
    assert [data for _, _, data in loads[:3]] == [b[: 2 * NBYTES] for b in blocks]
    assert [data for _, _, data in loads[3:]] == [b[2 * NBYTES :] for b in blocks]
    assert pull.num_bytes == 3 * BLOCK


def test_a_wrong_checksum_or_a_gap_leaves_the_block_to_the_whole_fetch_and_unpins_it():
    blocks = [bytes([i]) * BLOCK for i in range(3)]
    keys = [b"k0", b"k1", b"k2"]
    store, pull = FakeStore(blocks), LayerPull(keys, LAYERS, NBYTES)
    noop = lambda *a: None  # noqa: E731
    pull.add(group([b"k0", b"k1"], 0, 2), store, noop)
    pull.add(group([b"k2"], 1, 2), store, noop)  # k2 missed layer 0: never pinned, never read
    assert b"k2" not in store.pinned
    sums = [xxhash.xxh3_64_intdigest(b) for b in blocks]
    sums[1] ^= 1  # the bytes are not the block's
    assert pull.add(group(keys, 2, 3, sums), store, noop) == 1
    assert pull.ready == [True, False, False]
    assert store.released == [(b"k0", True), (b"k1", False)] and not store.held
    assert pull.missing_runs(3) == [(1, 3)]
    pull.mark_ready(1, 2)  # fetched whole after the seal
    assert pull.num_ready_prefix == 3 and pull.missing_runs(3) == []


def test_a_block_the_store_holds_elsewhere_or_not_at_all_is_released_unread():
    blocks = [bytes([i]) * BLOCK for i in range(3)]
    keys = [b"k0", b"k1", b"k2"]
    # k1 is staged in another slot (another writer), k2 is gone (the prefill gave it up)
    store = FakeStore(blocks, moved={b"k1": 2 * BLOCK, b"k2": None})
    pull, loads = LayerPull(keys, LAYERS, NBYTES), []
    pull.add(group(keys, 0, 1), store, recorder(loads))
    assert [start for _, start, _ in loads] == [0]
    assert store.released == [(b"k1", False), (b"k2", False)]
    sums = [xxhash.xxh3_64_intdigest(b) for b in blocks]
    pull.add(group(keys, 1, 3, sums), store, recorder(loads))
    assert pull.ready == [True, False, False] and not store.held


def test_a_foreign_layout_is_refused_without_a_pin():
    store = FakeStore([bytes(BLOCK)] * 2)
    pull = LayerPull([b"k0", b"k1"], LAYERS, NBYTES)
    other = StagedLayers((b"k1",), (BLOCK,), 0, 1, NBYTES * 2)  # another model's layer size
    assert pull.add(other, store, lambda *a: pytest.fail("loaded a foreign layout")) == 0
    assert store.pinned == [] and pull.missing_runs(2) == [(0, 2)]
