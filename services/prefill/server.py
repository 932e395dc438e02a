"""gRPC wiring of the prefill worker (grpc.aio): messages in, worker calls, messages out.

Errors are mapped here and only here, into pdserve.errors' vocabulary (whose tables give the
status): ValueError → InvalidRequest, OverloadedError → Overloaded, deadline →
DeadlineExceeded, cancel → Cancelled, an unknown Handoff → NotFound, anything else →
InternalError. A client that cancels (or whose deadline passes) has its request
aborted in the engine at once.

Telemetry: the server runs under the tracing interceptor (one SERVER span per RPC); each
Prefill opens ``prefill.request`` inside it (request id bound into the log lines), hands its
context to the engine thread, and returns it in ``PrefillResponse.trace`` so the decode
worker's KV fetch can link to it.
"""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from pdserve import wire
from pdserve._proto.pdserve.v1 import prefill_pb2, prefill_pb2_grpc
from pdserve.errors import (
    Cancelled,
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    NotFound,
    Overloaded,
    PdserveError,
    grpc_status,
)
from pdserve.grpc_server import WorkerServer, serve_until_signalled
from pdserve.telemetry import Attr, inject_context, links_from, request_span
from services.prefill.settings import PrefillSettings
from services.prefill.worker import (
    CancelledError,
    DeadlineExceededError,
    OverloadedError,
    PrefillWorker,
)

log = structlog.get_logger(__name__)
_HANDOFF_WAIT_S = 5.0  # a Handoff may arrive before its Prefill call
SERVICE_NAME = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, worker: PrefillWorker) -> None:
        self.worker = worker
        # Each followed handoff blocks one thread between events; the default executor (a
        # handful of threads) would let a few followers stall every other one.
        self._follow_pool = ThreadPoolExecutor(
            worker.settings.max_queued_requests, thread_name_prefix="prefill-follow"
        )

    async def Prefill(self, request, context):
        request_id = request.request_id or uuid.uuid4().hex
        attributes = {
            Attr.OPERATION: "text_completion", Attr.SYSTEM: "pdserve", Attr.ROLE: "prefill",
            Attr.INPUT_TOKENS: len(request.prompt_token_ids),
        }  # fmt: skip
        with request_span(
            "prefill.request", request_id, links=_links(request), **attributes
        ) as span:
            result, params = await self._prefill(request, request_id, context, span)
            span.set_attributes({
                Attr.CACHED_TOKENS: result.num_cached_tokens,
                Attr.COMPUTED_TOKENS: result.num_computed_tokens,
                Attr.KV_BLOCKS: len(result.kv.block_keys), Attr.KV_NODE: result.kv.node_id,
            })  # fmt: skip
            response = _response(result, params.logprobs is not None)
            response.trace.CopyFrom(wire.trace_to_proto(inject_context()))
            return response

    async def _prefill(self, request, request_id: str, context, span: trace.Span):
        try:
            sampling = request.sampling if request.HasField("sampling") else None
            params = wire.sampling_from_proto(sampling)
            prompt = wire.prompt_from_proto(
                request.prompt_token_ids, self.worker.engine.model_config.vocab_size
            )
            span.set_attribute(Attr.MAX_TOKENS, params.max_tokens)
            future = self.worker.submit(
                prompt,
                params,
                request_id=request_id,
                cache_salt=request.cache_salt or None,
                timeout_s=context.time_remaining(),
                trace_context=inject_context(),
            )
        except ValueError as exc:
            await _abort(context, span, InvalidRequest(str(exc)))
        except OverloadedError as exc:
            await _abort(context, span, Overloaded(str(exc)))
        try:
            return await asyncio.wrap_future(future), params
        except asyncio.CancelledError:
            self.worker.cancel(request_id)
            raise
        except DeadlineExceededError as exc:
            await _abort(context, span, DeadlineExceeded(str(exc)))
        except CancelledError as exc:
            await _abort(context, span, Cancelled(str(exc)))
        except ValueError as exc:
            await _abort(context, span, InvalidRequest(str(exc)))
        except Exception as exc:  # noqa: BLE001 - the status says why
            log.exception("prefill.failed")
            await _abort(context, span, InternalError(f"prefill failed: {exc}"))

    async def Handoff(self, request, context):
        """Stream ``worker.follow``: it blocks, so each step runs on a follow thread."""
        events = self.worker.follow(request.request_id, request.wait_s or _HANDOFF_WAIT_S)
        settings, loop = self.worker.settings, asyncio.get_running_loop()
        try:
            while (
                item := await loop.run_in_executor(self._follow_pool, next, events, None)
            ) is not None:
                keys, result, trace_context, groups = item
                kv = wire.KVSource(keys, settings.kvstore_address, settings.kv_node_id)
                event = prefill_pb2.HandoffEvent(
                    kv=wire.kv_source_to_proto(kv), trace=wire.trace_to_proto(trace_context),
                    layers=[_layers(g, self.worker.engine.layer_nbytes) for g in groups],
                )  # fmt: skip
                if result is not None:
                    event.done.CopyFrom(_response(result, result.first_token.logprob is not None))
                yield event
        except KeyError as exc:
            await _abort_with(context, NotFound(str(exc.args[0])))
        except DeadlineExceededError as exc:
            await _abort_with(context, DeadlineExceeded(str(exc)))
        except CancelledError as exc:
            await _abort_with(context, Cancelled(str(exc)))
        except RuntimeError as exc:
            await _abort_with(context, InternalError(f"prefill failed: {exc}"))

    async def Stats(self, request, context):
        load = self.worker.load
        return prefill_pb2.PrefillStatsResponse(
            worker_id=self.worker.worker_id,
            running=load.running,
            waiting=load.waiting,
            num_prompt_tokens_computed=load.num_prompt_tokens_computed,
            num_prompt_tokens_cached=load.num_prompt_tokens_cached,
        )


def _links(request) -> list[trace.Link]:
    """A link to ``PrefillRequest.trace`` when it names another trace than the metadata's."""
    entries = wire.trace_from_proto(request.trace) if request.HasField("trace") else {}
    current = trace.get_current_span().get_span_context().trace_id
    return [link for link in links_from(entries) if link.context.trace_id != current]


async def _abort(context, span: trace.Span, exc: PdserveError) -> None:
    """Record the status on the request span, then end the RPC with it (raises)."""
    code = grpc.StatusCode[grpc_status(exc)]
    span.set_attribute(Attr.RPC_STATUS, code.value[0])
    span.set_status(Status(StatusCode.ERROR, f"{code.name}: {exc.message}"))
    log.info("prefill.rejected", status=code.name, detail=exc.message)
    await context.abort(code, exc.message)


async def _abort_with(context, exc: PdserveError) -> None:
    await context.abort(grpc.StatusCode[grpc_status(exc)], exc.message)


def _layers(group, layer_nbytes: int) -> prefill_pb2.HandoffLayers:
    return prefill_pb2.HandoffLayers(
        block_keys=group.keys, slot_offsets=group.slot_offsets, layer_start=group.layer_start,
        layer_end=group.layer_end, layer_nbytes=layer_nbytes, checksums=group.checksums,
    )  # fmt: skip


def _response(result, with_logprob: bool) -> prefill_pb2.PrefillResponse:
    msg = prefill_pb2.PrefillResponse(
        first_token_id=result.first_token.token_id,
        kv=wire.kv_source_to_proto(result.kv),
        num_cached_tokens=result.num_cached_tokens,
        num_computed_tokens=result.num_computed_tokens,
        worker_id=result.worker_id,
    )
    if with_logprob:
        msg.first_logprob.CopyFrom(wire.logprob_to_proto(result.first_token))
    return msg


class PrefillServer(WorkerServer[PrefillWorker]):
    role = "prefill"
    service_name = SERVICE_NAME
    worker_cls = PrefillWorker

    def add_servicer(self, worker: PrefillWorker, server: grpc.aio.Server) -> None:
        prefill_pb2_grpc.add_PrefillServicer_to_server(PrefillServicer(worker), server)


async def serve(settings: PrefillSettings) -> None:
    await serve_until_signalled(PrefillServer(settings), "prefill")
