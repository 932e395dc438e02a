"""The kvstore serves only its cluster: mTLS (a service certificate of this cluster) or, with
mTLS off, the cluster token; everyone else is refused on every RPC, shared-memory ones included.
A real kvstore on 127.0.0.1 and the real clients (gRPC and shared-memory transports)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve._proto.pdserve.v1 import kvstore_pb2
from pdserve.kv.errors import KVError
from pdserve.kv.grpc_transport import GrpcTransport, SharedMemoryTransport
from pdserve.tls import ClusterSecurity
from services.kvstore.server import KVStoreServer
from tests.kvstore.helpers import key, payload, settings
from tests.security.conftest import CLUSTER

METHODS = kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].methods
TOKEN = "cluster-s3cret"


def start_store(tmp_path, redis_url, **security) -> KVStoreServer:
    server = KVStoreServer(
        settings(
            tmp_path, dram_blocks=8, redis_url=redis_url, cluster_name=CLUSTER,
            grpc_host="127.0.0.1", grpc_port=0, http_port=0, max_message_bytes=1 << 20,
            chunk_bytes=1024, **security,
        )
    )  # fmt: skip
    server.start()
    return server


@pytest.fixture
def mtls_store(tmp_path, redis_url, identities):
    me = identities["kvstore"]
    server = start_store(
        tmp_path, redis_url, tls_cert_file=me.cert_file, tls_key_file=me.key_file,
        tls_ca_file=me.ca_file,
    )  # fmt: skip
    yield server
    server.stop()


@pytest.fixture
def token_store(tmp_path, redis_url):
    server = start_store(tmp_path, redis_url, cluster_token=TOKEN)
    yield server
    server.stop()


def call_every_rpc(channel: grpc.Channel, metadata=()) -> dict[str, grpc.StatusCode]:
    """Each KVStore method called with an empty message: name -> status code."""
    codes = {}
    for m in METHODS:
        path = f"/{m.containing_service.full_name}/{m.name}"
        try:
            if m.client_streaming:
                channel.stream_unary(path)(iter([b""]), timeout=5, metadata=metadata)
            elif m.server_streaming:
                list(channel.unary_stream(path)(b"", timeout=5, metadata=metadata))
            else:
                channel.unary_unary(path)(b"", timeout=5, metadata=metadata)
            codes[m.name] = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            codes[m.name] = exc.code()
    return codes


def round_trip(transport, first: int = 0) -> None:
    blocks = [(key(i), payload(i)) for i in range(first, first + 3)]
    assert transport.put_blocks(blocks).num_stored == 3
    assert transport.get_blocks([k for k, _ in blocks]) == [p for _, p in blocks]


@pytest.mark.parametrize("cls", [GrpcTransport, SharedMemoryTransport])
def test_a_cluster_service_reads_and_writes_over_mtls(mtls_store, identities, cls):
    transport = cls(f"127.0.0.1:{mtls_store.port}", chunk_bytes=1024,
                    security=identities["decode"])  # fmt: skip
    try:
        assert getattr(transport, "shared", True)  # shm really used on this host
        round_trip(transport)
    finally:
        transport.close()


@pytest.mark.parametrize("caller", ["plaintext", "no-certificate", "foreign"])
def test_no_or_a_foreign_certificate_is_refused_at_the_handshake(mtls_store, identities, caller):
    address = f"127.0.0.1:{mtls_store.port}"
    ca = identities["kvstore"].ca_pem
    channel = {
        "plaintext": lambda: grpc.insecure_channel(address),
        "no-certificate": lambda: grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)),
        "foreign": lambda: identities["foreign"].channel(address, []),
    }[caller]()
    with channel:
        codes = call_every_rpc(channel)
    assert set(codes.values()) == {grpc.StatusCode.UNAVAILABLE}, codes
    transport = GrpcTransport(address, security=identities["foreign"], timeout_s=5)
    with pytest.raises(KVError, match="UNAVAILABLE"):
        transport.put_blocks([(key(1), payload(1))])
    assert mtls_store.node.store.lookup([key(1)]).prefix_blocks == 0


@pytest.mark.parametrize("caller", ["operator", "other-cluster"])
def test_a_cluster_ca_certificate_naming_no_service_here_is_unauthenticated(
    mtls_store, identities, caller
):
    """Signed by the cluster CA, so the handshake passes; the store still refuses every RPC."""
    with identities[caller].channel(f"127.0.0.1:{mtls_store.port}", []) as channel:
        codes = call_every_rpc(channel)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert codes == {m.name: grpc.StatusCode.UNAUTHENTICATED for m in METHODS}
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes stay possible


def test_without_mtls_every_rpc_needs_the_cluster_token(token_store):
    address = f"127.0.0.1:{token_store.port}"
    with grpc.insecure_channel(address) as channel:
        none = call_every_rpc(channel)
        wrong = call_every_rpc(channel, (("x-pdserve-cluster-token", "guess"),))
    unauthenticated = {m.name: grpc.StatusCode.UNAUTHENTICATED for m in METHODS}
    assert none == unauthenticated and wrong == unauthenticated
    for first, cls in ((0, GrpcTransport), (10, SharedMemoryTransport)):
        transport = cls(address, chunk_bytes=1024, security=ClusterSecurity(token=TOKEN))
        try:
            round_trip(transport, first)
        finally:
            transport.close()


def test_a_store_without_credentials_refuses_nothing(tmp_path, redis_url):
    """The development default (a warning in the log): the old behaviour, kept."""
    server = start_store(tmp_path, redis_url)
    try:
        transport = GrpcTransport(f"127.0.0.1:{server.port}", chunk_bytes=1024)
        round_trip(transport)
        transport.close()
    finally:
        server.stop()
