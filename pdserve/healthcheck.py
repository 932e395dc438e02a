"""``python -m pdserve.healthcheck HOST:PORT [SERVICE]``: exit 0 when the gRPC health check
says SERVING, 1 otherwise. For container health checks (docker compose, Kubernetes exec
probes) where no grpc_health_probe binary is installed. On a cluster with mTLS it presents
the container's own certificate (the ``PDSERVE_TLS_*`` variables).
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.config import ServiceSettings
from pdserve.tls import ClusterSecurity


def check(
    address: str, service: str = "", timeout_s: float = 2.0, security: ClusterSecurity | None = None
) -> bool:
    security = security or ClusterSecurity.from_settings(ServiceSettings())
    with security.channel(address, []) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2 or ":" not in args[0]:
        sys.stderr.write("usage: python -m pdserve.healthcheck HOST:PORT [SERVICE]\n")
        return 2
    ok = check(*args)
    sys.stdout.write("SERVING\n" if ok else "NOT SERVING\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
