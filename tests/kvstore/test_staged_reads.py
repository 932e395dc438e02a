"""Reads of blocks still being written (layer-pipelined handoffs): MapShared with
include_staged on the same host, GetStaged from another, each counted and pinned by the store
under a lease that is given back on every path."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from pdserve._proto.pdserve.v1 import kvstore_pb2
from pdserve.kv.blocks import Tier, checksum
from pdserve.kv.errors import CapacityError, InvalidBlockError
from pdserve.kv.transport import ByteRange
from services.kvstore.store import TieredStore
from tests.kvstore.helpers import (
    BLOCK,
    FakeClock,
    key,
    open_transport,
    payload,
    running_server,
    settings,
)

HALF = BLOCK // 2


def _staged_half(store: TieredStore, i: int) -> int:
    """Block ``i`` with its first half written into a reserved slot; the slot's offset."""
    [offset] = store.reserve_shared([key(i)])
    store.segment.view[offset : offset + HALF] = payload(i)[:HALF]
    return offset


def test_map_with_staged_pins_a_staged_slot_and_counts_a_hit(tmp_path):
    store = TieredStore(settings(tmp_path))
    offset = _staged_half(store, 1)
    lease_id, [plain] = store.map_shared([key(1)], 5.0)
    assert plain is None  # without include_staged a staged block is a miss, as before
    store.unpin(lease_id)
    hits = store.stats().num_hits
    lease_id, [mapped] = store.map_shared([key(1)], 5.0, include_staged=True)
    assert (mapped.offset, mapped.checksum, mapped.tier, mapped.staged) == (
        offset, 0, Tier.DRAM, True,
    )  # fmt: skip
    assert store.stats().num_hits == hits + 1
    assert store.unpin(lease_id) == 1
    assert store.stats().num_leases == 0


def test_a_pinned_staged_slot_is_not_reused_after_discard_until_unpin(tmp_path):
    store = TieredStore(settings(tmp_path))  # 4 staging slots
    offset = _staged_half(store, 1)
    lease_id, _ = store.map_shared([key(1)], 5.0, include_staged=True)
    assert store.discard_staged([key(1)]) == 1  # the writer gave up
    others = store.reserve_shared([key(2), key(3), key(4)])
    assert offset not in others
    with pytest.raises(CapacityError):  # the held slot still counts against staging
        store.reserve_shared([key(5)])
    assert bytes(store.segment.view[offset : offset + HALF]) == payload(1)[:HALF]
    free = store._staging_pool.num_free
    store.unpin(lease_id)
    assert store._staging_pool.num_free == free + 1  # the slot went back to the pool
    store.reserve_shared([key(5)])


def test_an_expired_lease_frees_a_held_staged_slot(tmp_path):
    clock = FakeClock()
    store = TieredStore(settings(tmp_path), clock=clock)
    offset = _staged_half(store, 1)
    store.map_shared([key(1)], 1.0, include_staged=True)
    store.discard_staged([key(1)])
    store.reserve_shared([key(2), key(3), key(4)])
    clock.now += 2  # the reader died: nobody unpins
    free = store._staging_pool.num_free
    store.reserve_shared([key(5)])  # staging full: expired leases are released first
    assert store._staging_pool.num_free == free  # the held slot was freed, one taken
    assert store.stats().num_leases == 0
    assert bytes(store.segment.view[offset : offset + HALF]) == payload(1)[:HALF]


def test_sealed_in_place_the_lease_pins_the_stored_block(tmp_path):
    store = TieredStore(settings(tmp_path, dram_blocks=2))
    offset = _staged_half(store, 1)
    lease_id, _ = store.map_shared([key(1)], 5.0, include_staged=True)
    store.segment.view[offset + HALF : offset + BLOCK] = payload(1)[HALF:]
    store.seal(key(1), checksum(payload(1)), verify=False)
    assert store.stats().num_pinned_blocks == 1
    for i in range(2, 6):  # pressure on a 2-block DRAM tier without another tier
        store.put(key(i), payload(i))
    assert bytes(store.segment.view[offset : offset + BLOCK]) == payload(1)  # never evicted
    assert store.lookup([key(1)]).tiers == (Tier.DRAM,)
    store.unpin(lease_id)
    assert store.stats().num_pinned_blocks == 0


def test_reading_ranges_of_staged_stored_and_absent_blocks(tmp_path):
    store = TieredStore(settings(tmp_path, dram_blocks=2))
    _staged_half(store, 1)
    store.put(key(2), payload(2))
    hits, misses = store.stats().num_hits, store.stats().num_misses
    ranges = [(key(1), 0, HALF), (key(2), 100, 50), (key(9), 0, 10)]
    with store.reading_ranges(ranges) as (_, found):
        assert store.stats().num_leases == 1
        assert (bytes(found[0][0]), found[0][2]) == (payload(1)[:HALF], 0)
        assert (bytes(found[1][0]), found[1][2]) == (payload(2)[100:150], checksum(payload(2)))
        assert found[2] is None
    stats = store.stats()
    assert (stats.num_hits - hits, stats.num_misses - misses, stats.num_leases) == (2, 1, 0)
    with pytest.raises(RuntimeError), store.reading_ranges([(key(2), 0, 8)]):
        raise RuntimeError("the reader failed")
    assert store.stats().num_leases == 0
    with pytest.raises(InvalidBlockError), store.reading_ranges([(key(2), BLOCK - 8, 16)]):
        pass


def test_reading_ranges_reads_a_block_stored_on_ssd(tmp_path):
    store = TieredStore(settings(tmp_path, dram_blocks=1, ssd_blocks=2))
    store.put(key(1), payload(1))
    store.put(key(2), payload(2))  # demotes block 1 to SSD
    with store.reading_ranges([(key(1), 8, 32)]) as (_, [(view, tier, _)]):
        assert (bytes(view), tier) == (payload(1)[8:40], Tier.SSD)


# ---- over gRPC, with real servers on 127.0.0.1 -------------------------------------------


@pytest.fixture
def server(tmp_path, redis_url, cluster_name):
    with running_server(
        tmp_path, redis_url, cluster_name, dram_blocks=8, max_message_bytes=1 << 20,
        chunk_bytes=1024,
    ) as srv:  # fmt: skip
        yield srv


@pytest.fixture(params=["grpc", "shm", "inprocess"])
def transport(request, server):
    kv = open_transport(request.param, server)
    yield kv
    kv.close()


def _transferred_bytes(transport: str) -> float:
    labels = {"direction": "get", "transport": transport, "tier": "dram"}
    return REGISTRY.get_sample_value("pdserve_kv_transfer_bytes_total", labels) or 0.0


def test_read_staged_into_follows_a_block_from_staged_to_stored(transport, server):
    data, store = payload(7), server.node.store
    store.write_piece(key(7), 0, data[:HALF])  # the first half only: the block stays staged
    hits, moved = store.stats().num_hits, _transferred_bytes(transport.kind)
    out = [bytearray(HALF), bytearray(100), bytearray(8)]
    ranges = [ByteRange(key(7), 0, HALF), ByteRange(key(7), 200, 100), ByteRange(key(8), 0, 8)]
    assert transport.read_staged_into(ranges, out) == [True, True, False]
    assert (bytes(out[0]), bytes(out[1])) == (data[:HALF], data[200:300])
    assert store.stats().num_hits - hits == 1  # one block read (in two ranges)
    if transport.kind != "inproc":  # the server counts what it served (MapShared or GetStaged)
        assert _transferred_bytes(transport.kind) > moved
    store.write_piece(key(7), HALF, data[HALF:])
    store.seal(key(7), checksum(data))
    out = [bytearray(BLOCK)]
    assert transport.read_staged_into([ByteRange(key(7), 0, BLOCK)], out) == [True]
    assert bytes(out[0]) == data
    assert store.stats().num_leases == 0


def test_ranges_of_many_blocks_land_in_their_buffers_in_order(server):
    """Every range of staged and stored blocks lands in its own buffer, in order, although the
    ranges of one block are not adjacent (one hit per block); a buffer short is refused."""
    store = server.node.store
    for i in range(5, 9):
        store.put(key(i), payload(i))  # stored
    for i in range(1, 5):
        store.write_piece(key(i), 0, payload(i)[:HALF])  # staged (every slot), half written
    rpc = open_transport("grpc", server)
    ranges = [ByteRange(key(i), o, 64) for o in (0, 512) for i in range(1, 9)]  # 8 apart
    ranges.append(ByteRange(key(20), 0, 8))  # absent
    out = [bytearray(r.length) for r in ranges]
    hits, misses = store.stats().num_hits, store.stats().num_misses
    assert rpc.read_staged_into(ranges, out) == [True] * 16 + [False]
    assert [bytes(b) for b in out[:16]] == [
        payload(r.key[-1])[r.offset : r.offset + 64] for r in ranges[:16]
    ]
    stats = store.stats()
    assert (stats.num_hits - hits, stats.num_misses - misses, stats.num_leases) == (8, 1, 0)
    with pytest.raises(ValueError):
        rpc.read_staged_into(ranges, out[:-1])
    rpc.close()


def test_a_range_past_the_block_is_refused(transport):
    transport.put_blocks([(key(1), payload(1))])
    with pytest.raises(InvalidBlockError):
        transport.read_staged_into([ByteRange(key(1), BLOCK - 4, 8)], [bytearray(8)])


def _many_ranges(n: int) -> kvstore_pb2.GetStagedRequest:
    """More bytes than the connection's flow-control window: the server blocks mid-stream
    until the client reads."""
    ranges = [kvstore_pb2.StagedRange(key=key(1), offset=0, length=BLOCK) for _ in range(n)]
    return kvstore_pb2.GetStagedRequest(ranges=ranges)


def _wait_for_no_leases(store: TieredStore, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while store.stats().num_leases and time.monotonic() < deadline:
        time.sleep(0.02)
    return store.stats().num_leases


@pytest.fixture
def get_staged(server):
    server.node.store.put(key(1), payload(1))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield channel.unary_stream(
        "/pdserve.v1.KVStore/GetStaged", kvstore_pb2.GetStagedRequest.SerializeToString
    )
    channel.close()


def test_get_staged_releases_its_lease_when_the_reader_cancels(server, get_staged):
    call = get_staged(_many_ranges(4000), timeout=30)
    next(call)
    assert server.node.store.stats().num_leases == 1  # held while the stream is open
    call.cancel()
    assert _wait_for_no_leases(server.node.store) == 0


def test_get_staged_releases_its_lease_when_the_deadline_passes(server, get_staged):
    call = get_staged(_many_ranges(4000), timeout=0.5)
    next(call)
    time.sleep(0.8)  # the reader stalls past its deadline without cancelling
    assert _wait_for_no_leases(server.node.store) == 0
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_get_staged_releases_its_lease_when_the_reader_dies(server):
    server.node.store.put(key(1), payload(1))
    reader = textwrap.dedent(f"""
        import os, grpc
        from pdserve._proto.pdserve.v1 import kvstore_pb2
        ranges = [kvstore_pb2.StagedRange(key={key(1)!r}, offset=0, length={BLOCK})] * 4000
        channel = grpc.insecure_channel("127.0.0.1:{server.port}")
        call = channel.unary_stream("/pdserve.v1.KVStore/GetStaged",
                                    kvstore_pb2.GetStagedRequest.SerializeToString)
        stream = call(kvstore_pb2.GetStagedRequest(ranges=ranges), timeout=60)
        next(stream)
        print("reading", flush=True)
        os._exit(0)  # no cancel, no close: the connection just breaks
    """)
    proc = subprocess.run(
        [sys.executable, "-c", reader], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "reading"
    assert _wait_for_no_leases(server.node.store) == 0
