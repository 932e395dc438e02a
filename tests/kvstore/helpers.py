"""Tiny configurations shared by the kvstore tests."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pdserve.config import KVStoreSettings
from pdserve.kv.blocks import BlockKey
from pdserve.kv.grpc_transport import GrpcTransport, SharedMemoryTransport
from pdserve.kv.transport import InProcessTransport, KVTransport
from services.kvstore.server import KVStoreServer

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


@contextmanager
def running_server(
    tmp_path: Path, redis_url: str, cluster_name: str, **overrides
) -> Iterator[KVStoreServer]:
    """A kvstore server on 127.0.0.1 (a free port), with `settings(tmp_path, **overrides)`."""
    server = KVStoreServer(
        settings(
            tmp_path, redis_url=redis_url, cluster_name=cluster_name, grpc_host="127.0.0.1",
            grpc_port=0, **overrides,
        )
    )  # fmt: skip
    server.start()
    try:
        yield server
    finally:
        server.stop()


def open_transport(kind: str, server: KVStoreServer) -> KVTransport:
    """A client of `server` over "grpc", "shm" (shared memory) or "inprocess"."""
    address = f"127.0.0.1:{server.port}"
    return {
        "grpc": lambda: GrpcTransport(address, chunk_bytes=1024, max_message_bytes=1 << 20),
        "shm": lambda: SharedMemoryTransport(address, chunk_bytes=1024),
        "inprocess": lambda: InProcessTransport(server.node.store),
    }[kind]()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
