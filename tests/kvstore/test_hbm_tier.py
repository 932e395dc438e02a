"""The HBM tier on CUDA: exact bytes through a CUDA slab, and LRU demotion HBM → DRAM."""

import pytest
import torch

from pdserve.kv.blocks import Tier
from pdserve.kv.transport import InProcessTransport
from services.kvstore.store import TieredStore
from services.kvstore.tiers import CudaSlabPool
from tests.kvstore.helpers import BLOCK, FakeClock, key, payload, settings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_slab_round_trip_and_offset_writes_are_exact():
    pool = CudaSlabPool(num_slots=4, slot_bytes=64)
    slot = pool.allocate()
    payload = bytes(range(64))
    pool.write(slot, payload[:32])
    pool.write(slot, memoryview(payload)[32:], offset=32)
    assert bytes(pool.read(slot)) == payload
    assert pool.num_free == 3
    pool.free(slot)
    assert pool.num_free == 4


def test_store_puts_in_hbm_first_and_demotes_lru_to_dram(tmp_path):
    events = []
    store = TieredStore(
        settings(tmp_path, dram_blocks=4, hbm_capacity_bytes=2 * BLOCK),
        on_event=events.append,
        clock=FakeClock(),
    )
    kv = InProcessTransport(store)
    assert kv.put_blocks([(key(0), payload(0)), (key(1), payload(1))]).tiers == (Tier.HBM,) * 2
    kv.put_blocks([(key(2), payload(2))])  # HBM full: block 0 (least recent) moves to DRAM
    assert list(store.lookup([key(0), key(1), key(2)]).tiers) == [Tier.DRAM, Tier.HBM, Tier.HBM]
    assert kv.get_blocks([key(0), key(1), key(2)]) == [payload(0), payload(1), payload(2)]
    store.close()
