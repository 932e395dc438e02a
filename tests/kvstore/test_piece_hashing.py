"""A Put's pieces are hashed as they are copied into the staging slot when they arrive in
order, so the seal checks the block without reading the slot again; any other order falls
back to hashing the slot at the seal. Either way a wrong checksum is refused."""

from __future__ import annotations

import threading

import pytest

from pdserve.kv.blocks import Tier, checksum
from pdserve.kv.errors import ChecksumMismatchError
from services.kvstore import store as store_module
from services.kvstore.store import TieredStore
from tests.kvstore.helpers import BLOCK, FakeClock, key, payload, settings


@pytest.fixture
def store(tmp_path):
    store = TieredStore(settings(tmp_path, dram_blocks=4), clock=FakeClock())
    yield store
    store.close()


@pytest.fixture
def slot_hashes(monkeypatch) -> list[int]:
    """Counts the seals that hash the whole slot (store.checksum is only called there)."""
    calls: list[int] = []

    def counting(data) -> int:
        calls.append(len(data))
        return checksum(data)

    monkeypatch.setattr(store_module, "checksum", counting)
    return calls


def put_pieces(store: TieredStore, i: int, offsets: list[int], piece: int, block_checksum: int):
    data = payload(i)
    session = store.open_put()
    for offset in offsets:
        session.chunk(key(i), offset, memoryview(data)[offset : offset + piece])
    session.seal(key(i), block_checksum)
    return session.finish()


def test_pieces_in_order_are_verified_without_rereading_the_slot(store, slot_hashes):
    quarter = BLOCK // 4
    offsets = [0, quarter, 2 * quarter, 3 * quarter]
    assert put_pieces(store, 1, offsets, quarter, checksum(payload(1))).tiers == (Tier.DRAM,)
    assert slot_hashes == []
    with pytest.raises(ChecksumMismatchError):
        put_pieces(store, 2, offsets, quarter, checksum(payload(2)) ^ 1)
    assert slot_hashes == []
    assert store.get(key(1))[0] == payload(1) and store.get(key(2)) is None


def test_pieces_out_of_order_are_verified_by_hashing_the_slot(store, slot_hashes):
    quarter = BLOCK // 4
    offsets = [quarter, 0, 3 * quarter, 2 * quarter]
    assert put_pieces(store, 1, offsets, quarter, checksum(payload(1))).num_stored == 1
    with pytest.raises(ChecksumMismatchError):
        put_pieces(store, 2, offsets, quarter, checksum(payload(2)) ^ 1)
    assert slot_hashes == [BLOCK, BLOCK]
    assert store.get(key(1))[0] == payload(1) and store.get(key(2)) is None


def test_a_piece_copied_while_the_previous_one_is_hashed_is_not_lost(store, slot_hashes):
    """The second half arrives while the first is still being copied and hashed: it cannot
    extend the running hash, so the seal hashes the slot, and the checksum still decides."""
    half, data = BLOCK // 2, payload(3)
    first_started, release_first = threading.Event(), threading.Event()
    write = store._staging_pool.write

    def slow_first(slot, piece, offset=0, hasher=None):
        if offset == 0:
            first_started.set()
            release_first.wait(5)
        write(slot, piece, offset, hasher)

    store._staging_pool.write = slow_first
    first = threading.Thread(target=store.write_piece, args=(key(3), 0, data[:half]))
    first.start()
    assert first_started.wait(5)
    store.write_piece(key(3), half, data[half:])
    release_first.set()
    first.join()
    assert store.seal(key(3), checksum(data)) == Tier.DRAM
    assert slot_hashes == [BLOCK]
    assert store.get(key(3))[0] == data
