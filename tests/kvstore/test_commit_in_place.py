"""Commit in place: a block written into its shared-memory staging slot stays in that slot when
it is sealed into DRAM (no copy at the seal), including when a victim must leave first."""

from __future__ import annotations

from pdserve.kv.blocks import checksum
from services.kvstore.store import TieredStore
from tests.kvstore.helpers import BLOCK, key, payload, settings


def _shm_put(store: TieredStore, i: int) -> int:
    [offset] = store.reserve_shared([key(i)])
    store.segment.view[offset : offset + BLOCK] = payload(i)
    store.seal(key(i), checksum(payload(i)))
    return offset


def _mapped_offset(store: TieredStore, i: int) -> int:
    lease, [(offset, _, _, _)] = store.map_shared([key(i)], 5.0)
    store.unpin(lease)
    return offset


def test_sealed_block_keeps_its_staging_slot(tmp_path):
    store = TieredStore(settings(tmp_path, dram_blocks=2))
    offsets = [_shm_put(store, i) for i in range(2)]
    assert [_mapped_offset(store, i) for i in range(2)] == offsets
    assert [store.get(key(i))[0] for i in range(2)] == [bytearray(payload(i)) for i in range(2)]
    store.close()


def test_full_dram_evicts_a_victim_and_still_commits_in_place(tmp_path):
    store = TieredStore(settings(tmp_path, dram_blocks=2, ssd_blocks=4))
    for i in range(2):
        _shm_put(store, i)
    offset = _shm_put(store, 2)  # block 0 (LRU) is demoted to SSD to make room
    assert _mapped_offset(store, 2) == offset
    stats = store.stats()
    assert [(t.tier.label, t.num_blocks) for t in stats.tiers] == [("dram", 2), ("ssd", 1)]
    assert stats.num_staging_blocks == 0
    # Every slot is accounted for: fill staging to its limit, then the DRAM tier again.
    for i in range(3, 3 + 6):
        _shm_put(store, i)
    for i in range(3 + 6):
        found = store.get(key(i))
        assert found is None or found[0] == bytearray(payload(i))
    assert [t.num_blocks for t in store.stats().tiers] == [2, 4]
    store.close()
