"""The same-host writer: bytes go straight into reserved slots of the store's segment, put
hashes them as it copies, put_blocks pipelines batches through a small staging area, and
every path that does not seal gives its slots back at once."""

from __future__ import annotations

import pytest

from pdserve.kv.blocks import Tier, checksum
from pdserve.kv.errors import CapacityError, InvalidBlockError
from pdserve.kv.grpc_transport import SharedMemoryTransport
from tests.kvstore.helpers import BLOCK, key, payload, running_server


@pytest.fixture
def server(tmp_path, redis_url, cluster_name):
    with running_server(
        tmp_path, redis_url, cluster_name, dram_blocks=8, max_message_bytes=1 << 20,
        chunk_bytes=1024,
    ) as srv:  # fmt: skip
        yield srv


@pytest.fixture
def shm(server):
    kv = SharedMemoryTransport(f"127.0.0.1:{server.port}")
    assert kv.shared
    yield kv
    kv.close()


def _num_staging(server) -> int:
    return server.node.store.stats().num_staging_blocks


def test_put_blocks_pipelines_more_blocks_than_the_staging_area_holds(server, shm):
    blocks = [(key(i), payload(i)) for i in range(7)]  # staging 4: 7 batches of one
    result = shm.put_blocks(blocks)
    assert (result.num_stored, result.num_skipped) == (7, 0)
    assert [bytes(g) for g in shm.get_blocks([k for k, _ in blocks])] == [d for _, d in blocks]
    assert _num_staging(server) == 0
    again = shm.put_blocks(blocks[:3] + [(key(9), payload(9))], skip_existing=True)
    assert (again.num_stored, again.num_skipped) == (1, 3)


def test_put_seals_with_the_hash_of_the_bytes_it_copied(server, shm):
    with shm.open_writer() as writer:
        writer.put(key(1), payload(1))
    assert writer.close().num_stored == 1
    lease, [(offset, block_checksum, _, _)] = server.node.store.map_shared([key(1)], 5.0)
    assert block_checksum == checksum(payload(1))
    assert bytes(server.node.store.segment.view[offset : offset + BLOCK]) == payload(1)
    server.node.store.unpin(lease)


def test_a_write_past_the_block_end_is_refused_and_leaves_the_next_slot_alone(server, shm):
    writer = shm.open_writer()
    writer.reserve([key(1), key(2)])  # adjacent slots
    writer.write(key(2), 0, payload(2))
    with pytest.raises(InvalidBlockError, match="run past the block size"):
        writer.put(key(1), payload(1, BLOCK + 16))
    with pytest.raises(InvalidBlockError, match="run past the block size"):
        writer.write(key(1), BLOCK - 8, b"x" * 16)
    writer.seal(key(2), checksum(payload(2)))
    assert writer.close().num_stored == 1
    assert bytes(shm.get_blocks([key(2)])[0]) == payload(2)


def test_an_aborted_writer_gives_its_staging_slots_back_at_once(server, shm):
    writer = shm.open_writer()
    writer.reserve([key(1), key(2), key(3)])
    writer.put(key(1), payload(1))  # sealed: stays stored
    writer.write(key(2), 0, payload(2)[: BLOCK // 2])
    assert _num_staging(server) >= 2
    writer.abort()
    assert _num_staging(server) == 0
    assert shm.lookup([key(1), key(2), key(3)]).prefix_blocks <= 1
    assert shm.put_blocks([(key(2), payload(2)), (key(3), payload(3))]).num_stored == 2


def test_a_failing_put_blocks_keeps_the_sealed_batch_and_leaves_no_slot_behind(server, shm):
    blocks = [(key(i), payload(i)) for i in range(5)]
    blocks[3] = (key(3), payload(3, BLOCK + 1))  # batches of one (a third of 4 staging slots)
    with pytest.raises(InvalidBlockError):
        shm.put_blocks(blocks)  # fails while block 4's slot is being reserved ahead
    assert _num_staging(server) == 0
    assert shm.lookup([key(i) for i in range(5)]).tiers == (Tier.DRAM,) * 3 + (None, None)


def test_a_seal_the_store_refuses_gives_back_the_slots_sealed_after_it(server, shm):
    shm.put_blocks([(key(i), payload(i)) for i in range(8)])  # DRAM full ...
    lease = shm.pin([key(i) for i in range(8)], ttl_s=30)  # ... of blocks that may not move
    writer = shm.open_writer()
    writer.reserve([key(10), key(11)])
    writer.put(key(10), payload(10))
    writer.put(key(11), payload(11))
    with pytest.raises(CapacityError):
        writer.close()  # the first seal finds no room: the call ends there
    assert _num_staging(server) == 0
    assert shm.lookup([key(10), key(11)]).tiers == (None, None)
    shm.unpin(lease.lease_id)


def test_a_wrong_checksum_from_a_same_host_writer_is_caught_by_the_first_read(server, shm):
    with shm.open_writer() as writer:
        writer.write(key(1), 0, payload(1))
        writer.seal(key(1), checksum(payload(2)))  # committed unverified (SealShared) ...
    assert shm.get_blocks([key(1)]) == [None]  # ... and refused by every reader
    assert server.node.store.stats().num_corrupt == 1
    assert shm.lookup([key(1)]).tiers == (None,)  # dropped
