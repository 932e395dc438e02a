"""The cluster-auth interceptor on a grpc.aio server (what prefill and decode run under):
unary and streaming handlers refuse strangers with UNAUTHENTICATED and serve cluster peers;
the health check stays open."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from pdserve.cluster_auth import ClusterAuthPolicy
from pdserve.grpc_server import new_server
from pdserve.tls import ClusterSecurity
from tests.security.conftest import CLUSTER


def _handlers():
    async def say(request, context):
        return b"said"

    async def count(request, context):
        for i in range(3):
            yield bytes([i])

    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {"Say": grpc.unary_unary_rpc_method_handler(say),
         "Count": grpc.unary_stream_rpc_method_handler(count)},
    )  # fmt: skip


async def _calls(server_security: ClusterSecurity, caller: ClusterSecurity) -> dict:
    """Start an aio server guarded by ``server_security``; what ``caller`` gets from it."""
    server = new_server(1 << 20, auth=server_security.auth_policy())
    server.add_generic_rpc_handlers((_handlers(),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server_security.add_port(server, "127.0.0.1:0")
    await server.start()
    out = {}
    try:
        async with caller.aio_channel(f"127.0.0.1:{port}", []) as channel:
            for name, call in (
                ("Say", lambda: channel.unary_unary("/test.Echo/Say")(b"", timeout=5)),
                ("Count", lambda: _collect(channel.unary_stream("/test.Echo/Count")(b"", timeout=5))),
                ("Health", lambda: health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5)),
            ):  # fmt: skip
                try:
                    await call()
                    out[name] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    out[name] = exc.code()
    finally:
        await server.stop(None)
    return out


async def _collect(call) -> list:
    return [m async for m in call]


OK, REFUSED = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "caller, expected",
    [
        ("decode", {"Say": OK, "Count": OK, "Health": OK}),
        ("operator", {"Say": REFUSED, "Count": REFUSED, "Health": OK}),
        ("other-cluster", {"Say": REFUSED, "Count": REFUSED, "Health": OK}),
    ],
)
def test_mtls_workers_serve_only_services_of_their_cluster(identities, caller, expected):
    got = asyncio.run(_calls(identities["prefill"], identities[caller]))
    assert got == expected


@pytest.mark.parametrize(
    "token, expected",
    [
        ("s3cret", {"Say": OK, "Count": OK, "Health": OK}),
        ("guess", {"Say": REFUSED, "Count": REFUSED, "Health": OK}),
        (None, {"Say": REFUSED, "Count": REFUSED, "Health": OK}),
    ],
)
def test_token_mode_refuses_a_missing_or_wrong_token(token, expected):
    server = ClusterSecurity(cluster_name=CLUSTER, token="s3cret")
    with structlog.testing.capture_logs() as logs:
        got = asyncio.run(_calls(server, ClusterSecurity(cluster_name=CLUSTER, token=token)))
    assert got == expected
    refused = [e for e in logs if e["event"] == "cluster_auth.refused"]
    assert len(refused) == (0 if expected["Say"] == OK else 2)  # Say and Count
    assert "guess" not in repr(logs) and "s3cret" not in repr(logs)


def test_policy_without_credentials_admits_everyone_and_says_so():
    policy = ClusterAuthPolicy(CLUSTER, mutual=False)
    assert policy.is_open and policy.refusal("/x.Y/Z", {}, {}) is None


def test_the_token_is_not_in_a_repr():
    security = ClusterSecurity(cluster_name=CLUSTER, token="s3cret")
    assert "s3cret" not in repr(security) and "s3cret" not in repr(security.auth_policy())
