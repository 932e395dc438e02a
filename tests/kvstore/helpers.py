"""Tiny configurations shared by the kvstore tests."""

from __future__ import annotations

import random
from pathlib import Path

from pdserve.config import KVStoreSettings
from pdserve.kv.blocks import BlockKey

BLOCK = 4096


def key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "big"))


def payload(i: int, size: int = BLOCK) -> bytes:
    return random.Random(i).randbytes(size)


def settings(
    tmp_path: Path, *, dram_blocks: int = 2, ssd_blocks: int = 0, **overrides
) -> KVStoreSettings:
    fields = dict(
        node_id="node-a",
        cluster_name="test",
        block_size_bytes=BLOCK,
        dram_capacity_bytes=dram_blocks * BLOCK,
        ssd_capacity_bytes=ssd_blocks * BLOCK,
        ssd_dir=tmp_path / "ssd" if ssd_blocks else None,
        staging_blocks=4,
        shm_dir=tmp_path,
        chunk_bytes=1024 * 4,
    )
    fields.update(overrides)
    return KVStoreSettings(**fields)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
