"""LayerPull: the decode side of the layer-group handoff, without a model or a kvstore. A
segment is a bytearray, blocks are 3 layers of 4 bytes, loads are recorded."""

from __future__ import annotations

import xxhash

from services.decode.layers import LayerPull, StagedLayers

LAYERS, NBYTES = 3, 4
BLOCK = LAYERS * NBYTES


def segment_with(blocks: list[bytes]) -> bytearray:
    return bytearray(b"".join(blocks))


def reader(segment: bytearray):
    return lambda offset, n: memoryview(segment)[offset : offset + n]


def group(keys, start, end, checksums=()) -> StagedLayers:
    offsets = tuple(int(k[1:]) * BLOCK for k in keys)  # key b"k<i>" sits in slot i
    return StagedLayers(tuple(keys), offsets, start, end, NBYTES, tuple(checksums))


def test_layers_in_groups_load_and_verify_each_block():
    blocks = [bytes(range(i * BLOCK, (i + 1) * BLOCK)) for i in range(3)]
    keys = [b"k0", b"k1", b"k2"]
    pull, loads = LayerPull(keys, LAYERS, NBYTES), []
    read = reader(segment_with(blocks))

    def load(layers, start, data):
        loads.append((layers, start, bytes(data)))

    assert pull.add(group(keys, 0, 2), read, load) == 0
    assert pull.num_ready_prefix == 0  # no checksum yet: nothing counts
    sums = [xxhash.xxh3_64_intdigest(b) for b in blocks]
    assert pull.add(group(keys, 2, 3, sums), read, load) == 3
    assert pull.ready == [True, True, True] and pull.num_ready_prefix == 3
    assert [(layers, start) for layers, start, _ in loads] == [(range(0, 2), 0), (range(2, 3), 0)]
    assert loads[0][2] == b"".join(b[: 2 * NBYTES] for b in blocks)  # block after block
    assert loads[1][2] == b"".join(b[2 * NBYTES :] for b in blocks)
    assert pull.num_bytes == 3 * BLOCK


def test_a_wrong_checksum_or_a_gap_leaves_the_block_to_the_whole_fetch():
    blocks = [bytes([i]) * BLOCK for i in range(3)]
    keys = [b"k0", b"k1", b"k2"]
    pull = LayerPull(keys, LAYERS, NBYTES)
    read = reader(segment_with(blocks))
    noop = lambda *a: None  # noqa: E731
    pull.add(group([b"k0", b"k1"], 0, 2), read, noop)
    pull.add(group([b"k2"], 1, 2), read, noop)  # k2 missed layer 0: skipped
    sums = [xxhash.xxh3_64_intdigest(b) for b in blocks]
    sums[1] ^= 1  # the slot was reused: its bytes are not the block's
    assert pull.add(group(keys, 2, 3, sums), read, noop) == 1
    assert pull.ready == [True, False, False]
    assert pull.missing_runs(3) == [(1, 3)]
    pull.mark_ready(1, 2)  # fetched whole after the seal
    assert pull.num_ready_prefix == 3 and pull.missing_runs(3) == []


def test_blocks_split_into_runs_and_foreign_layouts_are_refused():
    blocks = [bytes([i]) * BLOCK for i in range(4)]
    keys = [b"k0", b"k1", b"k2", b"k3"]
    pull, starts = LayerPull(keys, LAYERS, NBYTES), []
    read = reader(segment_with(blocks))
    pull.add(
        group([b"k0", b"k1", b"k3"], 0, 1), read, lambda _layers, s, d: starts.append((s, len(d)))
    )
    assert starts == [(0, 2 * NBYTES), (3, NBYTES)]  # k2 is not in the group: two runs
    other = StagedLayers((b"k2",), (2 * BLOCK,), 0, 1, NBYTES * 2)  # another model's layer size
    assert pull.add(other, read, lambda *a: starts.append(a)) == 0 and len(starts) == 2
    assert pull.missing_runs(4) == [(0, 4)]
