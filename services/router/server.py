"""Router process wiring: grpc.aio ``Router`` service + aiohttp OpenAI API on one event loop.

Lifecycle: load the tokenizer and fingerprint → start discovery (Redis registry, location
index) → serve gRPC (health SERVING) and HTTP → on SIGTERM/SIGINT report NOT_SERVING, stop
accepting, let in-flight streams finish for ``shutdown_grace_s``, deregister.

Telemetry: the gRPC server runs under the tracing interceptor, except ``Generate``, whose
span is the router's own ``router.request`` (so one request is one root span, whether it
came over gRPC or HTTP); it continues the caller's trace when the metadata carries one.
The HTTP app serves ``/metrics`` next to the OpenAI API.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import grpc
import structlog
from aiohttp import web
from grpc_health.v1.health import aio as health_aio

from pdserve import metrics
from pdserve._proto.pdserve.v1 import router_pb2, router_pb2_grpc
from pdserve.grpc_server import (
    add_health_and_reflection,
    new_server,
    serve_until_signalled,
    set_serving,
)
from pdserve.grpc_tracing import AioServerTracingInterceptor, metadata_carrier
from pdserve.kv.metadata import Heartbeat, WorkerInfo, connect_for
from pdserve.telemetry import extract_context
from pdserve.tls import ClusterSecurity
from services.router import observe
from services.router.auth import TenantGate
from services.router.console import Console
from services.router.console_data import RecentSpans
from services.router.errors import RouterError
from services.router.openai_api import make_app
from services.router.router import ModelInfo, Router
from services.router.settings import RouterSettings
from services.router.workers import WorkerClients, WorkerDirectory

log = structlog.get_logger(__name__)
SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
GENERATE_METHOD = f"/{SERVICE_NAME}/Generate"


class RouterTracingInterceptor(AioServerTracingInterceptor):
    """Every method but Generate: that one's root span is ``router.request`` (router.py)."""

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method == GENERATE_METHOD:
            return await continuation(handler_call_details)
        return await super().intercept_service(continuation, handler_call_details)


async def abort_with(context: grpc.aio.ServicerContext, exc: RouterError) -> None:
    if exc.retry_after_s:
        context.set_trailing_metadata((("retry-after", str(exc.retry_after_s)),))
    await context.abort(grpc.StatusCode[exc.grpc_code], exc.message)


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, router: Router, gate: TenantGate) -> None:
        self._router = router
        self._gate = gate

    async def Generate(self, request, context):
        try:
            metadata = metadata_carrier(context.invocation_metadata())
            tenant = self._gate.authenticate(metadata.get("authorization"))
            stream = self._gate.generate(
                tenant, self._router, request, context.time_remaining(),
                trace_context=extract_context(metadata),
            )  # fmt: skip
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    yield chunk
        except RouterError as exc:
            await abort_with(context, exc)

    async def ListModels(self, request, context):
        try:
            metadata = dict(context.invocation_metadata() or ())
            self._gate.authenticate(metadata.get("authorization"))
        except RouterError as exc:
            await abort_with(context, exc)
        return router_pb2.ListModelsResponse(models=[self._router.model.name])


def load_model_info(settings: RouterSettings) -> ModelInfo:
    import torch

    from pdserve.model.loader import load_checkpoint

    checkpoint = load_checkpoint(settings.model, dtype=getattr(torch, settings.dtype))
    config = checkpoint.config
    return ModelInfo(
        name=settings.model_name,
        tokenizer=checkpoint.tokenizer,
        fingerprint=checkpoint.fingerprint,
        vocab_size=config.vocab_size,
        max_model_len=min(settings.max_model_len, config.max_position_embeddings),
    )


def api_security(settings: RouterSettings) -> ClusterSecurity:
    """The public APIs' TLS: their own certificate, else the cluster one; no client certificate."""
    if settings.api_tls_cert_file is not None:
        return ClusterSecurity(
            cert_file=settings.api_tls_cert_file, key_file=settings.api_tls_key_file
        )
    return ClusterSecurity(cert_file=settings.tls_cert_file, key_file=settings.tls_key_file)


class RouterServer:
    def __init__(self, settings: RouterSettings, spans: RecentSpans | None = None) -> None:
        """``spans``: the console's span buffer, already on this process's tracer provider."""
        self.settings = settings
        self.spans = spans or RecentSpans(settings.console_max_traces)
        self.model = load_model_info(settings)
        self.security = ClusterSecurity.from_settings(settings)
        self.gate = TenantGate.from_settings(settings)
        self.directory = WorkerDirectory(
            lambda: connect_for(settings), settings.cluster_name, settings.heartbeat_ttl_s,
            settings.registry_refresh_s,
        )  # fmt: skip
        self.clients = WorkerClients(settings.max_message_bytes, security=self.security)
        self.router = Router(settings, self.model, self.directory, self.clients)
        self.worker_id = f"router-{settings.node_id}-{os.getpid()}"
        self._heartbeat: Heartbeat | None = None
        self._runner: web.AppRunner | None = None
        self.grpc_port = 0
        self.http_port = 0

    async def start(self) -> None:
        s = self.settings
        self.directory.start()
        self.server = new_server(s.max_message_bytes, RouterTracingInterceptor())
        router_pb2_grpc.add_RouterServicer_to_server(
            RouterServicer(self.router, self.gate), self.server
        )
        self.health = add_health_and_reflection(
            self.server, SERVICE_NAME, health_aio.HealthServicer()
        )
        api = api_security(s)
        self.grpc_port = api.add_port(
            self.server, f"{s.grpc_host}:{s.grpc_port}", require_client_auth=False
        )
        await self.server.start()
        if s.http_port:
            app = make_app(self.router, self.gate)
            Console(
                self.router, self.directory.registry, self.spans,
                authenticate=self.gate.authenticate, key_required=not self.gate.keys.is_open,
            ).add_routes(app)  # fmt: skip
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(
                self._runner, s.http_host, s.http_port, ssl_context=api.http_ssl_context()
            )
            await site.start()
            self.http_port = self._runner.addresses[0][1]
        self._heartbeat = Heartbeat(self.directory.registry, self._info, s.heartbeat_interval_s)
        self._heartbeat.start()
        await set_serving(self.health, SERVICE_NAME, True)
        metrics.QUEUE_DEPTH.labels(observe.ROUTER_QUEUE).set_function(
            lambda: self.router.num_inflight
        )
        metrics.set_service_info(
            role="router", node=s.node_id, worker_id=self.worker_id, model=s.model_name
        )
        log.info("router.listening", grpc_port=self.grpc_port, http_port=self.http_port)

    def _info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            role="router",
            address=f"{self.settings.node_id}:{self.grpc_port}",
            node_id=self.settings.node_id,
            capacity={"max_inflight_requests": self.settings.max_inflight_requests},
            load={"running": self.router.num_inflight},
            started_unix_ms=int(time.time() * 1000),
        )

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.server.stop(self.settings.shutdown_grace_s)
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self.directory.stop()
        await self.clients.close()


async def serve_async(settings: RouterSettings, spans: RecentSpans | None = None) -> None:
    server = RouterServer(settings, spans)
    await serve_until_signalled(server, "router", suppress_stop_errors=True)


def serve(settings: RouterSettings, spans: RecentSpans | None = None) -> None:
    asyncio.run(serve_async(settings, spans))
