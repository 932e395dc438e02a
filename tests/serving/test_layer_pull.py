"""LayerPull: the decode side of the layer-group handoff, without a model. Mostly without a
kvstore too (a segment is a bytearray, blocks are 3 layers of 4 bytes, pins and loads are
recorded); StagedRanges, the other host's reads, against a real kvstore over gRPC."""

from __future__ import annotations

import pytest
import xxhash
from opentelemetry import trace

from pdserve.kv.compression import KVGeometry
from pdserve.tls import ClusterSecurity
from pdserve.wire import KVSource
from services.decode.fetch import KVFetcher
from services.decode.layers import LayerPull, StagedLayers
from services.decode.staged import StagedPins, StagedRanges
from tests.kvstore import helpers

LAYERS, NBYTES = 3, 4
BLOCK = LAYERS * NBYTES


class FakeStore:
    """StagedReads over a bytearray, as on the same host: key b"k<i>" sits in slot i unless
    ``moved`` says else (another slot, or None: not held)."""

    def __init__(self, blocks: list[bytes], moved: dict[bytes, int | None] | None = None) -> None:
        self.segment = bytearray(b"".join(blocks))
        self.moved = moved or {}
        self.pinned: list[bytes] = []  # in pin order
        self.reads: list[list[bytes]] = []  # the keys of each read call
        self.released: list[tuple[bytes, bool]] = []

    def slot(self, key: bytes) -> int | None:
        return self.moved.get(key, int(key[1:]) * BLOCK)

    def pin(self, keys):
        self.pinned += keys
        return [self.slot(k) is not None for k in keys]

    def read(self, group, picked):
        keys = [group.keys[j] for j in picked]
        assert all(k in self.held for k in keys), "read outside a pin"
        self.reads.append(keys)
        out = []
        for j in picked:
            slot = self.slot(group.keys[j])
            start = slot + group.layer_start * NBYTES
            end = slot + group.layer_end * NBYTES
            fits = slot == group.slot_offsets[j]
            out.append(memoryview(self.segment)[start:end] if fits else None)
        return out

    def release(self, keys, verified):
        assert all(k in self.held for k in keys), "released twice, or never pinned"
        self.released += zip(keys, verified, strict=True)

    def close(self):
        pass

    @property
    def held(self) -> set[bytes]:
        held = {k for k in self.pinned if self.slot(k) is not None}
        return held - {k for k, _ in self.released}


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
    assert store.reads == [keys, keys]  # one read per group, for all its blocks


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
    assert store.released == [(b"k1", False)]  # k2 was never held: nothing to give back
    sums = [xxhash.xxh3_64_intdigest(b) for b in blocks]
    pull.add(group(keys, 1, 3, sums), store, recorder(loads))
    assert pull.ready == [True, False, False] and not store.held


def test_a_foreign_layout_is_refused_without_a_pin():
    store = FakeStore([bytes(BLOCK)] * 2)
    pull = LayerPull([b"k0", b"k1"], LAYERS, NBYTES)
    other = StagedLayers((b"k1",), (BLOCK,), 0, 1, NBYTES * 2)  # another model's layer size
    assert pull.add(other, store, lambda *a: pytest.fail("loaded a foreign layout")) == 0
    assert store.pinned == [] and pull.missing_runs(2) == [(0, 2)]


def test_ranges_read_each_group_in_one_get_staged_call_and_hold_nothing_between(
    tmp_path, redis_url, cluster_name
):
    """Another host: two blocks being written (and one the store never had) pulled in two
    groups of two layers, one GetStaged per group; the store counts a hit per block per call
    and holds no lease once a call has ended; the absent block is left to the whole fetch."""
    layers, nbytes = 4, helpers.BLOCK // 4
    keys = [helpers.key(1), helpers.key(2), helpers.key(9)]
    data = [helpers.payload(1), helpers.payload(2)]
    kinds: list[str] = []

    def start_span(kind: str) -> trace.Span:
        kinds.append(kind)
        return trace.get_tracer(__name__).start_span("kv.fetch")

    with helpers.running_server(tmp_path, redis_url, cluster_name, dram_blocks=8) as server:
        store = server.node.store
        for k, d in zip(keys, data, strict=False):
            store.write_piece(k, 0, d[: 2 * nbytes])  # layers 0-1 written, the block staged
        transport = helpers.open_transport("grpc", server)
        reads, pull, loads = (
            StagedRanges(transport, start_span),
            LayerPull(keys, layers, nbytes),
            [],
        )
        hits, misses = store.stats().num_hits, store.stats().num_misses
        first = StagedLayers(tuple(keys), (0, 0, 0), 0, 2, nbytes)  # offsets: another host's
        assert pull.add(first, reads, recorder(loads)) == 0
        assert [(r, i, d) for r, i, d in loads] == [
            (range(0, 2), 0, data[0][: 2 * nbytes]), (range(0, 2), 1, data[1][: 2 * nbytes])
        ]  # fmt: skip
        assert store.stats().num_leases == 0  # the call's lease ended with it
        for k, d in zip(keys, data, strict=False):
            store.write_piece(k, 2 * nbytes, d[2 * nbytes :])
        sums = (xxhash.xxh3_64_intdigest(data[0]), xxhash.xxh3_64_intdigest(data[1]), 0)
        last = StagedLayers(tuple(keys), (0, 0, 0), 2, 4, nbytes, sums)
        assert pull.add(last, reads, recorder(loads)) == 2
        assert pull.ready == [True, True, False] and pull.missing_runs(3) == [(2, 3)]
        assert [d for _, _, d in loads[2:]] == [data[0][2 * nbytes :], data[1][2 * nbytes :]]
        stats = store.stats()
        assert (stats.num_hits - hits, stats.num_misses - misses) == (4, 1)
        assert stats.num_leases == 0 and kinds == ["grpc", "grpc"]  # one span per call
        transport.close()


def test_the_transports_kind_picks_how_layers_are_read(tmp_path, redis_url, cluster_name):
    """Shared memory: pinned in the segment; gRPC: GetStaged ranges, unless blocks are
    int8-encoded on that wire (then none: whole blocks after the seal); no store: none."""

    def span(kind: str) -> trace.Span:
        return trace.get_tracer(__name__).start_span("kv.fetch")

    def unreachable(source):
        raise ConnectionError("no kvstore there")

    geometry = KVGeometry(2, 16, 1, 64, "float32")
    with helpers.running_server(tmp_path, redis_url, cluster_name) as server:
        source = KVSource((), f"127.0.0.1:{server.port}", "node-a")

        def picked(kind: str | None, int8: KVGeometry | None = None) -> type | None:
            connect = (
                unreachable if kind is None else lambda _: helpers.open_transport(kind, server)
            )
            fetcher = KVFetcher(
                "node-b", allow_shm=True, timeout_s=5.0, security=ClusterSecurity(),
                connect=connect, int8_geometry=int8,
            )  # fmt: skip
            reads = fetcher.staged_reads(source, span)
            fetcher.close()
            return None if reads is None else type(reads)

        assert picked("shm") is StagedPins and picked("shm", geometry) is StagedPins
        assert picked("grpc") is StagedRanges and picked("grpc", geometry) is None
        assert picked(None) is None
