"""Fixtures for the serving tests: a real kvstore, prefill and decode workers behind real gRPC
servers in this process (each grpc.aio server on its own event-loop thread), the real
redis-server from tests/conftest.py, and the default model loaded once per session.

Sizes are tiny on purpose: 160-block kvstore, 96-block engine pools.
"""

from __future__ import annotations

import asyncio
import threading
import uuid

import grpc
import pytest
import torch

from pdserve._proto.pdserve.v1 import decode_pb2_grpc, prefill_pb2_grpc
from pdserve.config import KVStoreSettings
from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine, kv_block_nbytes
from pdserve.model.loader import Checkpoint, load_checkpoint
from services.kvstore.server import KVStoreServer

# Token-for-token comparisons need the exact path: quantized weights compute in bf16, whose
# results depend on the batch a request shares (a concurrent stream diverged from the offline
# engine). The kvstore holds exactly the engine's blocks (SmolLM2-135M, float32, 16 tokens).
EXACT = "none"
BLOCK_BYTES = kv_block_nbytes(EngineConfig(quantization=EXACT))
ENGINE_BLOCKS = 96
NODE = "localhost"  # node id that is also a dialable host name
PASSAGE = (
    "In distributed systems, consensus protocols such as Raft and Paxos let a group of machines "
    "agree on a sequence of values even when some of them fail. A compiler translates source "
    "code into machine code in stages: lexing, parsing, semantic analysis, optimisation and "
    "code generation."
)


class ServerThread:
    """Runs one grpc.aio server object (``start``/``stop`` coroutines) on a private loop."""

    def __init__(self, server) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._run(server.start())

    def _run(self, coro, timeout_s: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        self._run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="session")
def checkpoint() -> Checkpoint:
    return load_checkpoint(None, dtype=torch.float32)


@pytest.fixture(scope="session")
def oracle(checkpoint) -> LLMEngine:
    """The offline engine: what the disaggregated path must reproduce token for token."""
    return LLMEngine(
        EngineConfig(
            kv_cache_bytes=ENGINE_BLOCKS * BLOCK_BYTES,
            enable_prefix_caching=False,
            quantization=EXACT,
        ),
        checkpoint=checkpoint,
    )


@pytest.fixture(scope="session")
def serving_cluster() -> str:
    return f"serve{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def make_kvstore(redis_server, serving_cluster, tmp_path_factory):
    """Start a kvstore node (in-process gRPC server); stopped at session end unless stopped."""
    started: list[KVStoreServer] = []

    def make(**overrides) -> KVStoreServer:
        fields = dict(
            node_id=NODE, cluster_name=serving_cluster, redis_url=redis_server.url,
            grpc_host="127.0.0.1", grpc_port=0, http_port=0, block_size_bytes=BLOCK_BYTES,
            dram_capacity_bytes=160 * BLOCK_BYTES, staging_blocks=96,
            shm_dir=tmp_path_factory.mktemp("shm"), shutdown_grace_s=0.5, log_json=False,
        )  # fmt: skip
        fields.update(overrides)
        server = KVStoreServer(KVStoreSettings(**fields))
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def _worker_fields(redis_server, cluster: str) -> dict:
    return dict(
        node_id=NODE, cluster_name=cluster, redis_url=redis_server.url, grpc_host="127.0.0.1",
        grpc_port=0, http_port=0, kv_cache_bytes=ENGINE_BLOCKS * BLOCK_BYTES, quantization=EXACT,
        max_num_batched_tokens=512, heartbeat_interval_s=0.5, heartbeat_ttl_s=3.0,
        shutdown_grace_s=0.5, log_json=False,
    )  # fmt: skip


@pytest.fixture(scope="session")
def make_prefill(redis_server, serving_cluster, checkpoint):
    from services.prefill.server import PrefillServer
    from services.prefill.settings import PrefillSettings

    started: list[ServerThread] = []

    def make(kvstore_address: str, **overrides) -> ServerThread:
        fields = _worker_fields(redis_server, serving_cluster)
        # The layer-group handoff is opt-in; these workers run it, as the handoff tests expect.
        fields.update(kvstore_address=kvstore_address, handoff_layer_groups=4, **overrides)
        thread = ServerThread(PrefillServer(PrefillSettings(**fields), checkpoint=checkpoint))
        started.append(thread)
        return thread

    yield make
    for thread in started:
        thread.stop()


@pytest.fixture(scope="session")
def make_decode(redis_server, serving_cluster, checkpoint):
    from services.decode.server import DecodeServer
    from services.decode.settings import DecodeSettings

    started: list[ServerThread] = []

    def make(**overrides) -> ServerThread:
        fields = _worker_fields(redis_server, serving_cluster)
        fields.update(hbm_publish_interval_s=0.2, kv_fetch_timeout_s=2.0, **overrides)
        thread = ServerThread(DecodeServer(DecodeSettings(**fields), checkpoint=checkpoint))
        started.append(thread)
        return thread

    yield make
    for thread in started:
        thread.stop()


@pytest.fixture(scope="session")
def kvstore(make_kvstore) -> KVStoreServer:
    return make_kvstore()


@pytest.fixture(scope="session")
def prefill(make_prefill, kvstore) -> ServerThread:
    return make_prefill(f"127.0.0.1:{kvstore.port}")


@pytest.fixture(scope="session")
def decode(make_decode) -> ServerThread:
    return make_decode()


def _channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_send_message_length", 16 << 20),
            ("grpc.max_receive_message_length", 16 << 20),
        ],
    )


@pytest.fixture(scope="session")
def prefill_stub(prefill):
    channel = _channel(prefill.address)
    yield prefill_pb2_grpc.PrefillStub(channel)
    channel.close()


@pytest.fixture(scope="session")
def decode_stub(decode):
    channel = _channel(decode.address)
    yield decode_pb2_grpc.DecodeStub(channel)
    channel.close()
