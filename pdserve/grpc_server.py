"""The gRPC server bootstrap the pdserve services share.

Lifecycle of a served process (``serve_until_signalled``): SIGTERM/SIGINT handlers first →
``start()``: bind, health SERVING → signal → ``stop()``: health NOT_SERVING, in-flight RPCs
get ``shutdown_grace_s``, then the service's own cleanup (deregister, flush).

Every server gets the same message limits (sized for KV blocks), one SERVER span per RPC
(the tracing interceptor), the standard health service and reflection. ``WorkerServer`` is
the whole of it for an engine worker (prefill or decode) and its ``/metrics``.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from pdserve import metrics, port_file
from pdserve.cluster_auth import AioClusterAuthInterceptor, ClusterAuthPolicy
from pdserve.config import advertised_address
from pdserve.grpc_tracing import AioServerTracingInterceptor
from pdserve.kv.grpc_transport import channel_options
from pdserve.tls import ClusterSecurity

if TYPE_CHECKING:
    from pdserve.config import WorkerSettings
    from pdserve.model.loader import Checkpoint

log = structlog.get_logger(__name__)
H = TypeVar("H")


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """pdserve's message limits, without SO_REUSEPORT: gRPC sets it by default, and with it
    a second server binds a port another one serves, with no error, and takes its calls."""
    return [*channel_options(max_message_bytes), ("grpc.so_reuseport", 0)]


def new_server(
    max_message_bytes: int,
    interceptor: grpc.aio.ServerInterceptor | None = None,
    *,
    auth: ClusterAuthPolicy | None = None,
) -> grpc.aio.Server:
    """A grpc.aio server with pdserve's message limits under ``interceptor`` (default: tracing).

    ``auth``: callers that are not services of the cluster are refused first, before their
    trace context is trusted (see pdserve.cluster_auth)."""
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if auth is not None and not auth.is_open:
        interceptors.append(AioClusterAuthInterceptor(auth))
    interceptors.append(interceptor or AioServerTracingInterceptor())
    return grpc.aio.server(options=server_options(max_message_bytes), interceptors=interceptors)


def add_health_and_reflection(server: Any, service_name: str, servicer: H) -> H:
    """Register ``servicer`` (sync or aio ``HealthServicer``) and reflection on ``server``."""
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        (service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return servicer


async def set_serving(
    servicer: health_aio.HealthServicer, service_name: str, serving: bool
) -> None:
    """The server as a whole ("") and ``service_name``: SERVING or NOT_SERVING."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", service_name):
        await servicer.set(name, status)


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def serve_until_signalled(
    server: Service, role: str, *, suppress_stop_errors: bool = False
) -> None:
    """Start ``server``, wait for SIGTERM or SIGINT, log ``<role>.shutting_down``, stop it.

    The handlers are installed before ``start()``, so a signal while starting still ends in
    a graceful stop."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await server.start()
    await done.wait()
    log.info(f"{role}.shutting_down")
    try:
        await server.stop()
    except Exception:
        if not suppress_stop_errors:
            raise


class EngineWorker(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


W = TypeVar("W", bound=EngineWorker)


class WorkerServer(Generic[W]):
    """An engine worker behind a grpc.aio server, with health, reflection and message limits.

    ``await start()`` binds (``grpc_port=0`` picks a free port; see ``port``), loads the
    engine and registers in Redis; ``await stop()`` drains and deregisters. Subclasses name
    ``role``, ``service_name`` and ``worker_cls``, and register their servicer in
    ``add_servicer``.
    """

    role: ClassVar[str]
    service_name: ClassVar[str]
    worker_cls: ClassVar[Callable[..., Any]]

    def __init__(self, settings: WorkerSettings, *, checkpoint: Checkpoint | None = None):
        self.settings = settings
        self._checkpoint = checkpoint
        self.port = 0
        self.metrics: metrics.MetricsServer | None = None
        self._stopping = False
        self.worker: W | None = None

    def add_servicer(self, worker: W, server: grpc.aio.Server) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        s = self.settings
        security = ClusterSecurity.from_settings(s)
        self.server = new_server(s.max_message_bytes, auth=security.auth_policy())
        self.port = security.add_port(self.server, f"{s.grpc_host}:{s.grpc_port}")
        if security.auth_policy().is_open:
            log.warning(f"{self.role}.unauthenticated", hint="set tls_* files or cluster_token")
        address = advertised_address(s.advertise_address, s.node_id, self.port)
        worker_id = f"{self.role}-{s.node_id}-{self.port}"
        self.worker = await asyncio.to_thread(
            self.worker_cls, s, checkpoint=self._checkpoint, worker_id=worker_id, address=address
        )
        self.add_servicer(self.worker, self.server)
        self.health = add_health_and_reflection(
            self.server, self.service_name, health_aio.HealthServicer()
        )
        self.worker.start()
        await self.server.start()
        await set_serving(self.health, self.service_name, True)
        self.metrics = metrics.start_metrics_server(
            s.http_port, s.grpc_host, health=lambda: not self._stopping
        )
        metrics.set_service_info(role=self.role, node=s.node_id, worker_id=worker_id)
        http_port = self.metrics.port if self.metrics else None
        port_file.write(s.port_file, grpc_port=self.port, http_port=http_port)
        log.info(
            f"{self.role}.listening", port=self.port, address=address, worker_id=worker_id,
            metrics_port=http_port,
        )  # fmt: skip

    async def stop(self) -> None:
        self._stopping = True
        await set_serving(self.health, self.service_name, False)
        await self.server.stop(self.settings.shutdown_grace_s)
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop)
        if self.metrics is not None:
            self.metrics.stop()

    async def wait(self) -> None:
        await self.server.wait_for_termination()
