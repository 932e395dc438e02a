"""Router process wiring: grpc.aio ``Router`` service + aiohttp OpenAI API on one event loop.

Lifecycle: load the tokenizer and fingerprint → start discovery (Redis registry, location
index) → serve gRPC (health SERVING) and HTTP → on SIGTERM/SIGINT report NOT_SERVING, stop
accepting, let in-flight streams finish for ``shutdown_grace_s``, deregister.

The gRPC edge: ``GenerateRequest`` → :class:`GenerateInput` (every field range-checked,
bad ones INVALID_ARGUMENT naming the field) and the router's chunks → ``GenerateChunk``;
errors are mapped here once (``pdserve.errors.grpc_status``), with ``retry-after`` trailing
metadata on RESOURCE_EXHAUSTED.

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
import uuid

import grpc
import structlog
from aiohttp import web
from grpc_health.v1.health import aio as health_aio

from pdserve import metrics, port_file, wire
from pdserve._proto.pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from pdserve.errors import InvalidRequest, PdserveError, grpc_status
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
from services.router.messages import ChatMessage, Chunk, GenerateInput, RouteExplanation
from services.router.openai_api import make_app
from services.router.router import ModelInfo, Router
from services.router.settings import RouterSettings
from services.router.workers import GrpcWorkerClients, RedisWorkerDirectory

log = structlog.get_logger(__name__)
SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
GENERATE_METHOD = f"/{SERVICE_NAME}/Generate"


async def abort_with(context: grpc.aio.ServicerContext, exc: PdserveError) -> None:
    if exc.retry_after_s:
        context.set_trailing_metadata((("retry-after", str(exc.retry_after_s)),))
    await context.abort(grpc.StatusCode[grpc_status(exc)], exc.message)


def generate_input(req: router_pb2.GenerateRequest) -> GenerateInput:
    """The core's request from the wire; InvalidRequest naming the field on a bad value."""
    try:
        params = wire.sampling_from_proto(req.sampling if req.HasField("sampling") else None)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="sampling") from None
    kind = req.WhichOneof("input")
    fields: dict = {}
    if kind == "prompt":
        fields["prompt"] = req.prompt
    elif kind == "chat":
        fields["messages"] = tuple(ChatMessage(m.role, m.content) for m in req.chat.messages)
    elif kind == "prompt_token_ids":
        fields["prompt_token_ids"] = tuple(req.prompt_token_ids.ids)
    return GenerateInput(
        request_id=req.request_id, params=params, model=req.model,
        cache_salt=req.cache_salt or None, **fields,
    )  # fmt: skip


def route_to_proto(route: RouteExplanation) -> common_pb2.RouteExplanation:
    msg = common_pb2.RouteExplanation(
        prefill_worker=route.prefill_worker, decode_worker=route.decode_worker,
        disaggregated=route.disaggregated, reason=route.reason,
        prompt_tokens=route.prompt_tokens, uncached_tokens=route.uncached_tokens,
        decode_score=route.decode_score, prefill_score=route.prefill_score,
        prefill_attempts=route.prefill_attempts,
        predicted_local_ttft_s=route.predicted_local_ttft_s,
        predicted_remote_ttft_s=route.predicted_remote_ttft_s,
    )  # fmt: skip
    for c in route.cached:
        msg.cached.add(node_id=c.node_id, hbm=c.hbm, dram=c.dram, ssd=c.ssd)
    return msg


def chunk_to_proto(chunk: Chunk) -> router_pb2.GenerateChunk:
    msg = router_pb2.GenerateChunk(
        request_id=chunk.request_id,
        text=chunk.text,
        token_ids=chunk.token_ids,
        logprobs=[wire.logprob_to_proto(t) for t in chunk.logprobs],
        finish_reason=wire.finish_reason_to_proto(chunk.finish_reason),
    )
    if chunk.usage is not None:
        u = chunk.usage
        msg.usage.CopyFrom(wire.usage_to_proto(u.prompt_tokens, u.completion_tokens,
                                               u.cached_tokens))  # fmt: skip
    if chunk.route is not None:
        msg.route.CopyFrom(route_to_proto(chunk.route))
    return msg


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, router: Router, gate: TenantGate) -> None:
        self._router = router
        self._gate = gate

    async def Generate(self, request, context):
        try:
            metadata = metadata_carrier(context.invocation_metadata())
            tenant = self._gate.authenticate(metadata.get("authorization"))
            # Admitted: the response headers go out at once (the first token may be far).
            stream = self._gate.generate(
                tenant, self._router, generate_input(request), context.time_remaining(),
                trace_context=extract_context(metadata),
                on_admitted=lambda: context.send_initial_metadata(()),
            )  # fmt: skip
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    yield chunk_to_proto(chunk)
        except PdserveError as exc:
            await abort_with(context, exc)

    async def ListModels(self, request, context):
        try:
            metadata = dict(context.invocation_metadata() or ())
            self._gate.authenticate(metadata.get("authorization"))
        except PdserveError as exc:
            await abort_with(context, exc)
        return router_pb2.ListModelsResponse(models=[self._router.model.name])


def load_model_info(settings: RouterSettings) -> ModelInfo:
    import torch

    from pdserve.engine.engine_config import EngineConfig
    from pdserve.engine.llm_engine import requested_dtype
    from pdserve.model.loader import load_checkpoint
    from pdserve.model.quant import resolve_quantization, variant_fingerprint

    # `auto` resolves on this host's device, as a worker with device=auto does (bf16 on CUDA).
    dtype = requested_dtype(EngineConfig(model=settings.model, dtype=settings.dtype))
    # The router needs the tokenizer and the fingerprint, not the projection matrices.
    checkpoint = load_checkpoint(settings.model, dtype=dtype, projections=False)
    config = checkpoint.config
    # The workers' KV fingerprint: a quantized mode has its own (resolved on this host's
    # device, as a worker with device=auto does).
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mode = resolve_quantization(settings.quantization, device)
    return ModelInfo(
        name=settings.model_name,
        tokenizer=checkpoint.tokenizer,
        fingerprint=variant_fingerprint(checkpoint.fingerprint, mode),
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
        self.directory = RedisWorkerDirectory(
            lambda: connect_for(settings), settings.cluster_name, settings.heartbeat_ttl_s,
            settings.registry_refresh_s,
        )  # fmt: skip
        self.clients = GrpcWorkerClients(settings.max_message_bytes, security=self.security)
        self.worker_id = f"router-{settings.node_id}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.router = Router(settings, self.model, self.directory, self.clients, self.worker_id)
        self._heartbeat: Heartbeat | None = None
        self._runner: web.AppRunner | None = None
        self.grpc_port = 0
        self.http_port = 0

    async def start(self) -> None:
        s = self.settings
        self.directory.start()
        # Every method but Generate is traced here: its root span is router.request (router.py).
        tracing = AioServerTracingInterceptor(exclude=(GENERATE_METHOD,))
        self.server = new_server(s.max_message_bytes, tracing)
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
                self._runner, s.http_host, port_file.listen_port(s.http_port),
                ssl_context=api.http_ssl_context(),
            )  # fmt: skip
            await site.start()
            self.http_port = self._runner.addresses[0][1]
        # As often as the replicas read the registry: its load is their admission input.
        interval_s = min(s.heartbeat_interval_s, s.registry_refresh_s)
        self._heartbeat = Heartbeat(self.directory.registry, self._info, interval_s)
        self._heartbeat.start()
        await set_serving(self.health, SERVICE_NAME, True)
        metrics.QUEUE_DEPTH.labels(observe.ROUTER_QUEUE).set_function(
            lambda: self.router.num_inflight
        )
        metrics.set_service_info(
            role="router", node=s.node_id, worker_id=self.worker_id, model=s.model_name
        )
        port_file.write(s.port_file, grpc_port=self.grpc_port, http_port=self.http_port or None)
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
