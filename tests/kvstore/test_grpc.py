"""The kvstore over real gRPC (and shared memory), against a real redis-server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdserve import port_file
from pdserve._proto.pdserve.v1 import kvstore_pb2, kvstore_pb2_grpc
from pdserve.kv.blocks import Tier, checksum
from pdserve.kv.errors import BlockExistsError, InvalidBlockError
from pdserve.kv.grpc_transport import GrpcTransport, SharedMemoryTransport
from pdserve.kv.metadata import RedisLayout, WorkerRegistry, connect
from services.kvstore.server import KVStoreServer
from tests.kvstore.helpers import BLOCK, key, open_transport, payload, running_server, settings

BIG = 737_280  # SmolLM2-135M block


@pytest.fixture
def server(tmp_path, redis_url, cluster_name):
    with running_server(
        tmp_path, redis_url, cluster_name, dram_blocks=8, ssd_blocks=4,
        max_message_bytes=1 << 20, chunk_bytes=1024,
    ) as srv:  # fmt: skip
        yield srv


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield kvstore_pb2_grpc.KVStoreStub(channel)
    channel.close()


@pytest.fixture(params=["grpc", "shm", "inprocess"])
def transport(request, server):
    kv = open_transport(request.param, server)
    if request.param == "shm":
        assert kv.shared
    yield kv
    kv.close()


def test_round_trip_is_bit_exact_through_each_transport(transport):
    blocks = [(key(i), payload(i)) for i in range(10)]  # 8 in DRAM, 2 pushed to SSD
    result = transport.put_blocks(blocks)
    assert result.num_stored == 10
    assert transport.lookup([k for k, _ in blocks]).tiers == (Tier.SSD,) * 2 + (Tier.DRAM,) * 8
    got = transport.get_blocks([key(i) for i in [5, 0, 42, 9]])
    assert [bytes(g) if g is not None else None for g in got] == [
        payload(5),
        payload(0),
        None,
        payload(9),
    ]
    assert transport.stats().tier(Tier.DRAM).num_blocks == 8


def test_layer_by_layer_writes_through_each_transport(transport):
    data, layer = payload(3), BLOCK // 4
    with transport.open_writer(
        trace_context={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    ) as w:
        for start in (2 * layer, 0, 3 * layer, layer):  # layers finish in any order
            w.write(key(3), start, data[start : start + layer])
        w.seal(key(3), checksum(data))
    assert w.close().num_stored == 1
    assert bytes(transport.get_blocks([key(3)])[0]) == data


def test_pin_lookup_delete_over_grpc(transport):
    transport.put_blocks([(key(i), payload(i)) for i in range(3)])
    lease = transport.pin([key(0), key(7)], ttl_s=30)
    assert (lease.pinned, lease.missing) == ((key(0),), (key(7),))
    assert transport.delete([key(0), key(1)]).pinned == (key(0),)
    assert transport.lookup([key(0), key(1), key(2)]).prefix_blocks == 1
    assert transport.unpin(lease.lease_id) == 1
    assert transport.delete([key(0)]).num_deleted == 1


def test_shared_memory_mapped_views_are_zero_copy(server):
    kv = SharedMemoryTransport(f"127.0.0.1:{server.port}")
    kv.put_blocks([(key(1), payload(1))])
    with kv.mapped([key(1), key(2)]) as views:
        assert bytes(views[0]) == payload(1) and views[1] is None
        assert views[0].readonly
        assert server.node.store.stats().num_pinned_blocks == 1
    assert server.node.store.stats().num_pinned_blocks == 0
    kv.close()


def put_stream(stub, *requests):
    return stub.Put(iter(requests), timeout=10)


def chunk(i, offset, data):
    return kvstore_pb2.PutRequest(
        chunk=kvstore_pb2.BlockChunk(key=key(i), offset=offset, data=data)
    )


def seal(i, data):
    return kvstore_pb2.PutRequest(seal=kvstore_pb2.BlockSeal(key=key(i), checksum=checksum(data)))


@pytest.mark.parametrize(
    "requests, code, match",
    [
        (
            [chunk(1, 0, b"x" * (BLOCK + 8))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "runs past the block size",
        ),
        (
            [chunk(1, 0, b"x" * 100), seal(1, b"x" * 100)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "block size is 4096",
        ),
        (
            [chunk(1, 0, b"x" * 100), chunk(1, 50, b"y" * 100)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "overlaps",
        ),
        ([seal(1, b"")], grpc.StatusCode.INVALID_ARGUMENT, "before any of its bytes"),
        (
            [chunk(1, 0, payload(1)), seal(1, payload(1)), chunk(1, 0, b"z")],
            grpc.StatusCode.INVALID_ARGUMENT,
            "after its seal",
        ),
        ([chunk(1, 0, payload(1)), seal(1, payload(2))], grpc.StatusCode.DATA_LOSS, "checksum"),
        (
            [chunk(0, 0, payload(0)), seal(0, payload(0))],
            grpc.StatusCode.ALREADY_EXISTS,
            "already stored",
        ),
        (
            [chunk(1, 0, b"x"), kvstore_pb2.PutRequest(header=kvstore_pb2.PutHeader())],
            grpc.StatusCode.INVALID_ARGUMENT,
            "first message",
        ),
        (
            [kvstore_pb2.PutRequest(chunk=kvstore_pb2.BlockChunk(key=b"short", data=b"x"))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "16 bytes",
        ),
        ([chunk(1, 0, b"x" * (2 << 20))], grpc.StatusCode.RESOURCE_EXHAUSTED, ""),  # > max message
    ],
)
def test_bad_input_gets_a_clear_status_and_leaves_store_consistent(
    server, stub, requests, code, match
):
    put_stream(stub, chunk(0, 0, payload(0)), seal(0, payload(0)))
    with pytest.raises(grpc.RpcError) as info:
        put_stream(stub, *requests)
    assert info.value.code() == code
    assert match in info.value.details()
    store = server.node.store
    assert store.stats().num_staging_blocks == 0
    sealed_before_error = len(requests) == 3 and code == grpc.StatusCode.INVALID_ARGUMENT
    assert store.lookup([key(0), key(1)]).prefix_blocks == 1 + sealed_before_error
    assert store.get(key(0))[0] == payload(0)


def test_typed_errors_on_the_client(server):
    kv = GrpcTransport(f"127.0.0.1:{server.port}")
    kv.put_blocks([(key(0), payload(0))])
    with pytest.raises(BlockExistsError, match="ALREADY_EXISTS"):
        kv.put_blocks([(key(0), payload(0))])
    with pytest.raises(InvalidBlockError, match="block size"):
        kv.put_blocks([(key(1), payload(1, 100))])
    assert kv.put_blocks([(key(0), payload(0))], skip_existing=True).num_skipped == 1
    with pytest.raises(InvalidBlockError, match="16 bytes"):
        kv.get_blocks([b"bad"])
    assert kv.get_blocks([key(99)]) == [None]  # an unknown key is a miss, not an error
    kv.close()


def test_health_and_reflection(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="pdserve.v1.KVStore")).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (reply,) = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for s in reply.list_services_response.service}
    assert {"pdserve.v1.KVStore", "grpc.health.v1.Health"} <= names
    channel.close()


def test_large_blocks_stream_with_configured_limits(tmp_path, redis_url, cluster_name):
    srv = KVStoreServer(
        settings(
            tmp_path, block_size_bytes=BIG, dram_capacity_bytes=4 * BIG, redis_url=redis_url,
            cluster_name=cluster_name, grpc_host="127.0.0.1", grpc_port=0, chunk_bytes=1 << 20,
        )
    )  # fmt: skip
    srv.start()
    try:
        kv = GrpcTransport(f"127.0.0.1:{srv.port}", chunk_bytes=1 << 20)
        blocks = [(key(i), payload(i, BIG)) for i in range(3)]
        kv.put_blocks(blocks)
        assert [bytes(b) for b in kv.get_blocks([k for k, _ in blocks])] == [d for _, d in blocks]
        kv.close()
    finally:
        srv.stop()


def test_whole_block_messages_on_several_streams_arrive_in_place(tmp_path, redis_url, cluster_name):
    """Defaults: a block travels in one message (chunk_bytes > block) and is used where it
    landed; 7 keys on 3 streams come back in key order, a miss in the middle included."""
    srv = KVStoreServer(
        settings(
            tmp_path, block_size_bytes=BIG, dram_capacity_bytes=8 * BIG, redis_url=redis_url,
            cluster_name=cluster_name, grpc_host="127.0.0.1", grpc_port=0, chunk_bytes=4 << 20,
        )
    )  # fmt: skip
    srv.start()
    try:
        kv = GrpcTransport(f"127.0.0.1:{srv.port}", streams=3)
        blocks = [(key(i), payload(i, BIG)) for i in range(6)]
        assert kv.put_blocks(blocks).tiers == (Tier.DRAM,) * 6
        keys = [key(i) for i in (5, 0, 99, 1, 2, 3, 4)]
        got = kv.get_blocks(keys)
        assert [None if g is None else bytes(g) for g in got] == [
            None if int.from_bytes(k, "big") == 99 else payload(int.from_bytes(k, "big"), BIG)
            for k in keys
        ]
        assert all(isinstance(g, memoryview) for g in got if g is not None)  # not joined
        kv.close()
    finally:
        srv.stop()


def test_sigterm_flushes_and_deregisters(tmp_path, redis_url, cluster_name):
    ports_file = tmp_path / "ports.json"  # the kvstore binds a free port and reports it here
    env = dict(
        os.environ,
        PDSERVE_REDIS_URL=redis_url,
        PDSERVE_CLUSTER_NAME=cluster_name,
        PDSERVE_NODE_ID="node-s",
        PDSERVE_KVSTORE_GRPC_HOST="127.0.0.1",
        PDSERVE_KVSTORE_DRAM_CAPACITY_BYTES=str(4 * BLOCK),
        PDSERVE_KVSTORE_BLOCK_SIZE_BYTES=str(BLOCK),
        PDSERVE_KVSTORE_SHM_DIR=str(tmp_path),
        PDSERVE_KVSTORE_HTTP_PORT="0",
        PDSERVE_PORT_FILE=str(ports_file),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.kvstore", "--grpc-port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    client, layout = connect(redis_url), RedisLayout(cluster_name)
    registry = WorkerRegistry(client, layout, ttl_s=10)
    try:
        deadline = time.monotonic() + 20
        while not registry.workers("kvstore") or not (ports := port_file.read(ports_file)):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        kv = GrpcTransport(f"127.0.0.1:{ports['grpc_port']}")
        kv.put_blocks([(key(1), payload(1))])
        kv.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert registry.workers() == []
    assert client.hgetall(layout.node_blocks("node-s")) == {}  # DRAM blocks left with the process
    ops = [op for _, f in client.xrange(layout.events) for op in f[b"op"].split(b",")]
    assert ops[-2:] == [b"stored", b"evicted"]  # an entry may carry several events
    assert list(tmp_path.glob("pdserve-*")) == []  # shared memory unlinked


def test_shared_memory_get_into_caller_buffers(server):
    kv = SharedMemoryTransport(f"127.0.0.1:{server.port}")
    kv.put_blocks([(key(1), payload(1)), (key(2), payload(2))])
    server.node.store.segment.view[server.node.store.map_shared([key(2)], 1)[1][0][0]] ^= 1
    out = [bytearray(BLOCK) for _ in range(3)]
    assert kv.get_blocks_into([key(1), key(2), key(3)], out) == [True, False, False]
    assert out[0] == payload(1)
    kv.close()


def test_the_grpc_transport_builds_in_a_fresh_interpreter() -> None:
    # grpc.experimental is a submodule `import grpc` does not load; a script that built a
    # transport before anything else had imported it failed with an AttributeError.
    script = (
        "from pdserve.kv.grpc_transport import GrpcTransport\n"
        "GrpcTransport('127.0.0.1:1').close()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
