"""gRPC wiring of the decode worker (grpc.aio): messages in, worker calls, chunks out.

Errors are mapped here and only here, into pdserve.errors' vocabulary (whose tables give the
status): ValueError → InvalidRequest, OverloadedError → Overloaded, a failed request →
InternalError (after the chunks already sent). A client
that cancels the stream (or whose deadline passes) has its sequence aborted at once.

Telemetry: the server runs under the tracing interceptor (one SERVER span per RPC); each
Decode opens ``decode.request`` inside it (request id bound into the log lines) and hands
its context, and the prefill's ``DecodeRequest.trace``, to the worker (worker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid

import grpc
import structlog
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from pdserve import wire
from pdserve._proto.pdserve.v1 import decode_pb2, decode_pb2_grpc
from pdserve.errors import InternalError, InvalidRequest, Overloaded, PdserveError, grpc_status
from pdserve.grpc_server import WorkerServer, serve_until_signalled
from pdserve.telemetry import Attr, inject_context, request_span
from services.decode.settings import DecodeSettings
from services.decode.worker import DecodeEvent, DecodeSpec, DecodeWorker, OverloadedError

log = structlog.get_logger(__name__)
SERVICE_NAME = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name


def spec_from_proto(request: decode_pb2.DecodeRequest, vocab_size: int) -> DecodeSpec:
    """ValueError on any bad field."""
    sampling = request.sampling if request.HasField("sampling") else None
    first_token = None
    if request.HasField("first_token_id"):
        logprob = request.first_logprob if request.HasField("first_logprob") else None
        first_token = wire.sampled_token_from_proto(
            request.first_token_id, logprob, vocab_size=vocab_size
        )
    if request.prefill_address and (first_token is not None or request.HasField("kv")):
        raise ValueError("prefill_address comes without first_token_id and kv (they come from it)")
    if request.kv_fetch_timeout_s < 0:
        raise ValueError(f"kv_fetch_timeout_s must be >= 0, got {request.kv_fetch_timeout_s}")
    return DecodeSpec(
        request_id=request.request_id or uuid.uuid4().hex,
        prompt=wire.prompt_from_proto(request.prompt_token_ids, vocab_size),
        params=wire.sampling_from_proto(sampling),
        cache_salt=request.cache_salt or None,
        first_token=first_token,
        resume_token_ids=tuple(
            wire.prompt_from_proto(request.resume_token_ids, vocab_size)
            if request.resume_token_ids
            else ()
        ),
        kv=wire.kv_source_from_proto(request.kv if request.HasField("kv") else None),
        kv_fetch_timeout_s=request.kv_fetch_timeout_s or None,
        prefill_trace=wire.trace_from_proto(request.trace) if request.HasField("trace") else {},
        prefill_address=request.prefill_address or None,
    )


def chunk_to_proto(event: DecodeEvent, first: bool) -> decode_pb2.DecodeChunk:
    chunk = decode_pb2.DecodeChunk(
        token_ids=event.token_ids,
        text=event.text,
        logprobs=[wire.logprob_to_proto(t) for t in event.logprobs],
        finish_reason=wire.finish_reason_to_proto(event.finish_reason),
    )
    if first:
        chunk.num_kv_blocks_fetched = event.num_kv_blocks_fetched
        chunk.recomputed = event.recomputed
    if event.finish_reason is not None:
        chunk.usage.CopyFrom(
            wire.usage_to_proto(
                event.num_prompt_tokens, event.num_completion_tokens, event.num_cached_tokens
            )
        )
    return chunk


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, worker: DecodeWorker) -> None:
        self.worker = worker

    async def Decode(self, request, context):
        request_id = request.request_id or uuid.uuid4().hex
        attributes = {
            Attr.OPERATION: "text_completion", Attr.SYSTEM: "pdserve", Attr.ROLE: "decode",
            Attr.INPUT_TOKENS: len(request.prompt_token_ids),
        }  # fmt: skip
        with request_span("decode.request", request_id, **attributes) as span:
            # aclosing: a cancelled stream runs _decode's cleanup (worker.cancel) at once.
            async with contextlib.aclosing(self._decode(request, request_id, context, span)) as it:
                async for chunk in it:
                    yield chunk

    async def _decode(self, request, request_id: str, context, span: trace.Span):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[DecodeEvent] = asyncio.Queue()
        try:
            spec = spec_from_proto(request, self.worker.engine.model_config.vocab_size)
            spec = dataclasses.replace(spec, request_id=request_id, trace_context=inject_context())
            span.set_attribute(Attr.MAX_TOKENS, spec.params.max_tokens)
            self.worker.submit(spec, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        except ValueError as exc:
            await _abort(context, span, InvalidRequest(str(exc)))
        except OverloadedError as exc:
            await _abort(context, span, Overloaded(str(exc)))
        finished, first = False, True
        try:
            while not finished:
                event = await events.get()
                finished = event.is_last
                if event.error is not None:
                    await _abort(context, span, InternalError(event.error))
                if event.finish_reason is not None:
                    span.set_attributes({
                        Attr.FINISH_REASONS: [event.finish_reason],
                        Attr.OUTPUT_TOKENS: event.num_completion_tokens,
                    })  # fmt: skip
                yield chunk_to_proto(event, first)
                first = False
        finally:
            if not finished:  # cancelled, deadline, or the client went away
                span.set_attribute(Attr.FINISH_REASONS, ["abort"])
                self.worker.cancel(spec.request_id)

    async def Stats(self, request, context):
        load = self.worker.load
        return decode_pb2.DecodeStatsResponse(
            worker_id=self.worker.worker_id,
            running=load.running,
            waiting=load.waiting,
            num_free_blocks=load.num_free_blocks,
            num_total_blocks=load.num_total_blocks,
            num_cached_blocks=load.num_cached_blocks,
            num_prompt_tokens_computed=load.num_prompt_tokens_computed,
            num_generation_tokens=load.num_generation_tokens,
        )


async def _abort(context, span: trace.Span, exc: PdserveError) -> None:
    """Record the status on the request span, then end the RPC with it (raises)."""
    code = grpc.StatusCode[grpc_status(exc)]
    span.set_attribute(Attr.RPC_STATUS, code.value[0])
    span.set_status(Status(StatusCode.ERROR, f"{code.name}: {exc.message}"))
    log.info("decode.rejected", status=code.name, detail=exc.message)
    await context.abort(code, exc.message)


class DecodeServer(WorkerServer[DecodeWorker]):
    role = "decode"
    service_name = SERVICE_NAME
    worker_cls = DecodeWorker

    def add_servicer(self, worker: DecodeWorker, server: grpc.aio.Server) -> None:
        decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(worker), server)


async def serve(settings: DecodeSettings) -> None:
    await serve_until_signalled(DecodeServer(settings), "decode")
