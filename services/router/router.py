"""The router's request logic: parse → plan (pure policy) → admit → prefill? → decode stream.

Request lifecycle::

    received → parsed (tokenized, validated; else InvalidRequest)
             → planned (decode worker, prefill worker or none; else NoWorkers)
             → admitted (else Overloaded: RESOURCE_EXHAUSTED / 429 + Retry-After)
             → prefilling (remote; a failure is retried once on another worker, then the
               decode worker prefills locally)
             → streaming (decode chunks forwarded; the route explanation rides the first)
             → finished | failed (WorkerFailed / DeadlineExceeded) | cancelled (the client left;
               closing the decode stream aborts the sequence on the worker)

Worker calls go through ``WorkerClients`` (the only grpc user); a worker that fails with
UNAVAILABLE is kept out of rotation for ``heartbeat_ttl_s`` (its registry entry may outlive it).

Telemetry: each request is one span ``router.request`` (SERVER; the root unless the caller
sent a trace context) with children ``router.route`` (one per plan: decision, reason, every
candidate's score), ``router.admission`` and the CLIENT spans of the Prefill and Decode calls.
The prefill's ``PrefillResponse.trace`` rides on in ``DecodeRequest.trace``, so the decode's
KV fetch is linked to the prefill that wrote the blocks. Metrics and log lines: observe.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import structlog
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind

from pdserve import wire
from pdserve._proto.pdserve.v1 import (
    common_pb2,
    decode_pb2,
    prefill_pb2,
    router_pb2,
)
from pdserve.engine.block_hash import BlockKey, chain_block_keys, root_key
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv.blocks import Tier
from pdserve.kv.metadata import NodePrefix, WorkerInfo
from pdserve.telemetry import Attr, get_tracer, request_span
from services.router import observe, policy
from services.router.affinity import PrefixAffinity
from services.router.errors import (
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
    NoWorkers,
    Overloaded,
    RouterError,
    WorkerFailed,
)
from services.router.settings import RouterSettings
from services.router.workers import WorkerCallError, WorkerClients, WorkerDirectory

log = structlog.get_logger(__name__)
_tracer = get_tracer("pdserve.router")
_EWMA_ALPHA = 0.2
_MIN_TOKENS_FOR_RATE = 64


@dataclass(frozen=True)
class ParsedRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    tokenizer: object  # pdserve.model.tokenizer.Tokenizer
    fingerprint: str
    vocab_size: int
    max_model_len: int


class Router:
    def __init__(
        self,
        settings: RouterSettings,
        model: ModelInfo,
        directory: WorkerDirectory,
        clients: WorkerClients,
    ) -> None:
        self.settings = settings
        self.model = model
        self.directory = directory
        self.clients = clients
        self.affinity = PrefixAffinity(settings.affinity_capacity_blocks)
        self.weights = policy.Weights(settings.overlap_weight, settings.load_weight)
        self.num_inflight = 0
        self._inflight: Counter[str] = Counter()  # worker id -> requests
        self._queued_tokens: Counter[str] = Counter()  # worker id -> prompt tokens to compute
        self._down_until: dict[str, float] = {}
        self.prefill_tokens_per_s = settings.prefill_tokens_per_s

    # ---- parsing ----

    def parse(self, req: router_pb2.GenerateRequest, request_id: str = "") -> ParsedRequest:
        if req.model and req.model != self.model.name:
            raise ModelNotFound(
                f"model {req.model!r} is not served here (available: {self.model.name!r})",
                param="model",
            )
        try:
            params = wire.sampling_from_proto(req.sampling if req.HasField("sampling") else None)
            token_ids = self._tokenize(req)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        if not token_ids:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        limit = self.model.max_model_len
        if len(token_ids) + params.max_tokens > limit:
            raise InvalidRequest(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the model's context of {limit} tokens",
                param="max_tokens" if len(token_ids) < limit else "prompt",
            )
        request_id = request_id or req.request_id or new_request_id()
        return ParsedRequest(request_id, token_ids, params, req.cache_salt or None)

    def _tokenize(self, req: router_pb2.GenerateRequest) -> list[int]:
        kind = req.WhichOneof("input")
        if kind == "prompt":
            if not req.prompt:
                raise ValueError("prompt must not be empty")
            return self.model.tokenizer.encode(req.prompt)
        if kind == "chat":
            messages = [{"role": m.role, "content": m.content} for m in req.chat.messages]
            if not messages:
                raise ValueError("messages must not be empty")
            return self.model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if kind == "prompt_token_ids":
            return wire.prompt_from_proto(req.prompt_token_ids.ids, self.model.vocab_size)
        raise ValueError("give one of prompt, chat or prompt_token_ids")

    # ---- planning ----

    def _alive(self, role: str) -> list[WorkerInfo]:
        now = time.monotonic()
        return [
            w for w in self.directory.workers(role) if self._down_until.get(w.worker_id, 0) < now
        ]

    def _mark_down(self, worker_id: str) -> None:
        self._down_until[worker_id] = time.monotonic() + self.settings.heartbeat_ttl_s
        self.affinity.forget_worker(worker_id)

    def _loads(
        self, workers: Sequence[WorkerInfo], cached_tokens: dict[str, int]
    ) -> list[policy.WorkerLoad]:
        cap = self.settings.max_inflight_per_worker
        out = []
        for w in workers:
            reported = int(w.load.get("running", 0) + w.load.get("waiting", 0))
            out.append(
                policy.WorkerLoad(
                    worker_id=w.worker_id,
                    num_inflight=max(self._inflight[w.worker_id], reported),
                    capacity=cap,
                    cached_tokens=cached_tokens.get(w.worker_id, 0),
                    queued_prefill_tokens=self._queued_tokens[w.worker_id],
                )
            )
        return out

    def _plan(
        self, keys: Sequence[BlockKey], num_prompt_tokens: int, exclude_prefill: set[str]
    ) -> tuple[policy.RoutePlan | None, dict[str, WorkerInfo], list[NodePrefix], dict]:
        """The plan, the candidates by id, the cached prefixes, and every candidate's score."""
        bs = self.settings.block_size
        prefixes = self.directory.prefixes(keys)
        by_node = {p.node_id: p.num_blocks for p in prefixes}
        decode, prefill = self._alive("decode"), self._alive("prefill")
        cached: dict[str, int] = {}
        for w in decode:
            # Only the worker's own cache counts: its local-prefill path reuses that and
            # nothing else (blocks in its node's store are reached through a handoff).
            blocks = max(
                self.affinity.prefix_blocks(w.worker_id, keys), by_node.get(w.worker_id, 0)
            )
            cached[w.worker_id] = blocks * bs
        for w in prefill:
            cached[w.worker_id] = by_node.get(w.node_id, 0) * bs
        decode_loads, prefill_loads = self._loads(decode, cached), self._loads(prefill, cached)
        plan = policy.plan_route(
            decode_loads,
            prefill_loads,
            num_prompt_tokens,
            self.weights,
            self.settings.disagg_threshold_tokens,
            exclude_prefill,
        )
        infos = {w.worker_id: w for w in decode + prefill}
        scores = {
            role: {
                w.worker_id: round(policy.score(w, num_prompt_tokens, self.weights), 4)
                for w in loads
                if w.worker_id not in exclude_prefill
            }
            for role, loads in (("decode", decode_loads), ("prefill", prefill_loads))
        }
        return plan, infos, prefixes, scores

    def _route(self, keys, num_prompt_tokens: int, exclude_prefill: set[str], attempt: int):
        """:meth:`_plan` inside a ``router.route`` span that records the decision."""
        with _tracer.start_as_current_span("router.route") as span:
            plan, infos, prefixes, scores = self._plan(keys, num_prompt_tokens, exclude_prefill)
            if plan is None:
                span.set_attribute(Attr.ROUTE, "none")
            else:
                reason_class = plan.disaggregation.reason_class
                span.set_attributes(observe.route_attributes(plan, scores, reason_class, attempt))
        return plan, infos, prefixes

    def _admit(self, plan: policy.RoutePlan, timeout_s: float, obs: observe.RequestObserver):
        """Admission control inside ``router.admission``; raises Overloaded on a refusal."""
        target = plan.prefill.worker_id if plan.prefill else plan.decode.worker_id
        queued = self._queued_tokens[target]
        ttft = policy.predict_ttft_s(queued, plan.uncached_tokens, self.prefill_tokens_per_s)
        attributes = {Attr.QUEUE: observe.ROUTER_QUEUE, "pdserve.admission.num_inflight":
                      self.num_inflight, "pdserve.admission.predicted_ttft_s": round(ttft, 4)}  # fmt: skip
        with _tracer.start_as_current_span("router.admission", attributes=attributes) as span:
            verdict = policy.admit(
                self.num_inflight, self.settings.max_inflight_requests, ttft, timeout_s,
                queued, self.prefill_tokens_per_s,
            )  # fmt: skip
            span.set_attributes({
                "pdserve.admission.admitted": verdict.admitted,
                Attr.QUEUE_WAIT_S: round(time.monotonic() - obs.arrived, 6),
            })  # fmt: skip
            if not verdict.admitted:
                span.set_attribute("pdserve.admission.reason", verdict.reason_class)
                raise Overloaded(
                    verdict.reason, retry_after_s=verdict.retry_after_s,
                    reason_class=verdict.reason_class,
                )  # fmt: skip

    # ---- serving ----

    async def generate(
        self,
        req: router_pb2.GenerateRequest,
        deadline_s: float | None = None,
        *,
        trace_context: otel_context.Context | None = None,
    ) -> AsyncIterator[router_pb2.GenerateChunk]:
        """Stream one request's chunks; raises a RouterError subclass on failure.

        ``trace_context``: the caller's (from gRPC metadata or HTTP headers), None for a new
        trace. Close the iterator (``contextlib.aclosing``) in the task that iterates it.
        """
        request_id = req.request_id or new_request_id()
        attributes = observe.request_attributes(req, self.model.name)
        with request_span(
            "router.request", request_id, context=trace_context, kind=SpanKind.SERVER,
            **attributes,
        ) as span:  # fmt: skip
            obs = observe.RequestObserver(span)
            try:
                async for chunk in self._generate(req, request_id, deadline_s, obs):
                    obs.chunk(chunk)
                    yield chunk
            except RouterError as exc:
                obs.failed(exc)
                raise
            except (GeneratorExit, asyncio.CancelledError):
                obs.cancelled()
                raise
            except Exception as exc:
                obs.failed(RouterError(f"internal error: {exc!r}"))
                raise
            obs.finished()

    async def _generate(self, req, request_id: str, deadline_s, obs: observe.RequestObserver):
        parsed = self.parse(req, request_id)
        n = len(parsed.prompt_token_ids)
        obs.parsed(n, parsed.params.max_tokens)
        timeout_s = min(deadline_s or self.settings.default_deadline_s, 24 * 3600)
        deadline = time.monotonic() + timeout_s
        keys = chain_block_keys(
            parsed.prompt_token_ids,
            self.settings.block_size,
            root_key(self.model.fingerprint, parsed.cache_salt),
        )
        plan, infos, prefixes = self._route(keys, n, set(), attempt=1)
        if plan is None:
            raise NoWorkers("no decode worker is available; is the stack up?")
        self._admit(plan, timeout_s, obs)
        obs.admitted(n)
        self.num_inflight += 1
        try:
            async for chunk in self._serve(parsed, keys, plan, infos, prefixes, deadline, obs):
                yield chunk
        finally:
            self.num_inflight -= 1

    async def _serve(self, parsed, keys, plan, infos, prefixes, deadline, obs):
        excluded: set[str] = set()
        attempts, prefilled, reason_prefix = 0, None, ""
        while plan.prefill is not None:
            attempts += 1
            worker = infos[plan.prefill.worker_id]
            try:
                prefilled = await self._prefill(worker, parsed, plan, deadline)
                break
            except WorkerCallError as exc:
                if exc.kind == "invalid":
                    raise InvalidRequest(exc.message) from None
                log.warning("router.prefill_failed", worker=worker.worker_id, error=exc.message)
                if exc.kind == "unavailable":
                    self._mark_down(worker.worker_id)
                excluded.add(worker.worker_id)
                reason_prefix += f"prefill on {worker.worker_id} failed ({exc.kind}); "
                self._check_deadline(deadline, "prefill")
                if attempts >= self.settings.prefill_attempts:
                    excluded |= {w.worker_id for w in self.directory.workers("prefill")}
                n = len(parsed.prompt_token_ids)
                plan, infos, prefixes = self._route(keys, n, excluded, attempts + 1)
                if plan is None:
                    raise NoWorkers("no decode worker is available") from None
        failed_over = bool(reason_prefix) and plan.prefill is None
        obs.routed(plan, policy.PREFILL_FAILED if failed_over else plan.disaggregation.reason_class)
        route = self._explain(plan, prefixes, prefilled, attempts, reason_prefix)
        request = self._decode_request(parsed, prefilled)
        async for chunk in self._decode(plan, infos, parsed, keys, request, route, deadline):
            yield chunk

    async def _prefill(self, worker, parsed, plan, deadline) -> prefill_pb2.PrefillResponse:
        request = prefill_pb2.PrefillRequest(
            request_id=parsed.request_id,
            prompt_token_ids=parsed.prompt_token_ids,
            sampling=wire.sampling_to_proto(parsed.params),
            cache_salt=parsed.cache_salt or "",
        )
        wid = worker.worker_id
        self._inflight[wid] += 1
        self._queued_tokens[wid] += plan.uncached_tokens
        started = time.monotonic()
        try:
            timeout = min(self.settings.prefill_timeout_s, self._remaining(deadline, "prefill"))
            response = await self.clients.prefill(worker.address, request, timeout)
        finally:
            self._inflight[wid] -= 1
            self._queued_tokens[wid] -= plan.uncached_tokens
        self._observe_rate(response.num_computed_tokens, time.monotonic() - started)
        return response

    def _observe_rate(self, num_tokens: int, elapsed_s: float) -> None:
        if num_tokens >= _MIN_TOKENS_FOR_RATE and elapsed_s > 0:
            rate = num_tokens / elapsed_s
            self.prefill_tokens_per_s += _EWMA_ALPHA * (rate - self.prefill_tokens_per_s)

    def _decode_request(self, parsed: ParsedRequest, prefilled) -> decode_pb2.DecodeRequest:
        request = decode_pb2.DecodeRequest(
            request_id=parsed.request_id,
            prompt_token_ids=parsed.prompt_token_ids,
            sampling=wire.sampling_to_proto(parsed.params),
            cache_salt=parsed.cache_salt or "",
            kv_fetch_timeout_s=self.settings.kv_fetch_timeout_s,
        )
        if prefilled is not None:
            request.first_token_id = prefilled.first_token_id
            if prefilled.HasField("first_logprob"):
                request.first_logprob.CopyFrom(prefilled.first_logprob)
            request.kv.CopyFrom(prefilled.kv)
            # The prefill's span: the decode worker links its KV fetch to it.
            request.trace.CopyFrom(prefilled.trace)
        return request

    async def _decode(self, plan, infos, parsed, keys, request, route, deadline):
        worker = infos[plan.decode.worker_id]
        wid = worker.worker_id
        self.affinity.record(wid, keys)
        local_tokens = plan.uncached_tokens if plan.prefill is None else 0
        self._inflight[wid] += 1
        self._queued_tokens[wid] += local_tokens
        num_chunks, queued = 0, local_tokens
        cached = route.prompt_tokens - route.uncached_tokens if route.disaggregated else None
        try:
            stream = self.clients.decode(
                worker.address, request, self._remaining(deadline, "decode")
            )
            async for chunk in self._paced(stream, deadline, wid):
                if num_chunks == 0:
                    self._queued_tokens[wid] -= queued
                    queued = 0
                num_chunks += 1
                yield self._to_generate_chunk(
                    parsed, chunk, route if num_chunks == 1 else None, cached
                )
        except WorkerCallError as exc:
            if exc.kind == "invalid":
                raise InvalidRequest(exc.message) from None
            if exc.kind == "deadline":
                raise DeadlineExceeded(f"request timed out on decode worker {wid}") from None
            if exc.kind == "unavailable":  # the worker is gone, not just this request
                self._mark_down(wid)
            raise WorkerFailed(
                f"decode worker {wid} failed after {num_chunks} chunks: {exc.message}"
            ) from None
        finally:
            self._inflight[wid] -= 1
            self._queued_tokens[wid] -= queued

    async def _paced(self, stream, deadline: float, wid: str):
        """Forward chunks, failing a stream that stalls or outlives the deadline."""
        first = True
        try:
            while True:
                limit = (
                    self.settings.decode_first_chunk_timeout_s
                    if first
                    else self.settings.decode_stall_timeout_s
                )
                wait_s = min(limit, self._remaining(deadline, "decode"))
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), wait_s)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    self._check_deadline(deadline, "decode")
                    self._mark_down(wid)
                    raise WorkerFailed(
                        f"decode worker {wid} sent nothing for {wait_s:.1f}s; giving up"
                    ) from None
                first = False
                yield chunk
        finally:
            await stream.aclose()

    def _remaining(self, deadline: float, phase: str) -> float:
        self._check_deadline(deadline, phase)
        return deadline - time.monotonic()

    @staticmethod
    def _check_deadline(deadline: float, phase: str) -> None:
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"deadline exceeded during {phase}")

    def _to_generate_chunk(self, parsed, chunk, route, cached_tokens) -> router_pb2.GenerateChunk:
        out = router_pb2.GenerateChunk(
            request_id=parsed.request_id,
            text=chunk.text,
            token_ids=list(chunk.token_ids),
            logprobs=list(chunk.logprobs),
            finish_reason=chunk.finish_reason,
        )
        if chunk.HasField("usage"):
            out.usage.CopyFrom(chunk.usage)
            if cached_tokens is not None:  # disaggregated: what the prefill did not compute
                out.usage.cached_tokens = cached_tokens
        if route is not None:
            out.route.CopyFrom(route)
        return out

    def _explain(
        self, plan, prefixes, prefilled, attempts, reason_prefix
    ) -> common_pb2.RouteExplanation:
        bs = self.settings.block_size
        route = common_pb2.RouteExplanation(
            prefill_worker=plan.prefill.worker_id if plan.prefill else "",
            decode_worker=plan.decode.worker_id,
            disaggregated=plan.prefill is not None,
            reason=reason_prefix + plan.disaggregation.reason,
            prompt_tokens=plan.num_prompt_tokens,
            uncached_tokens=plan.uncached_tokens,
            decode_score=plan.decode.score,
            prefill_score=plan.prefill.score if plan.prefill else 0.0,
            prefill_attempts=attempts,
        )
        if prefilled is not None:
            route.uncached_tokens = prefilled.num_computed_tokens
        for p in prefixes:
            tiers = p.num_blocks_by_tier
            route.cached.add(
                node_id=p.node_id,
                hbm=tiers.get(Tier.HBM, 0) * bs,
                dram=tiers.get(Tier.DRAM, 0) * bs,
                ssd=tiers.get(Tier.SSD, 0) * bs,
            )
        return route

    def stats(self) -> dict:
        return {
            "num_inflight": self.num_inflight,
            "prefill_workers": len(self._alive("prefill")),
            "decode_workers": len(self._alive("decode")),
            "redis_ok": self.directory.redis_ok,
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 1),
        }


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"
