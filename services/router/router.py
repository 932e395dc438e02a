"""The router's request logic: parse → plan (pure policy) → admit → prefill? → decode stream.

The core speaks plain data (messages.py): it takes a :class:`GenerateInput` and yields
:class:`Chunk` s; protobuf and JSON stay at the edges (server.py, openai_api.py, workers.py).

Request lifecycle::

    received → parsed (tokenized, validated; else InvalidRequest)
             → planned (decode worker, prefill worker or none; else NoWorkers)
             → admitted (else Overloaded: RESOURCE_EXHAUSTED / 429 + Retry-After)
             → prefilling (remote; a failure is retried on another worker up to
               ``prefill_attempts``, then the decode worker prefills locally; with the
               overlapped handoff the Decode call starts with the Prefill and is cancelled
               and restarted with the retry)
             → streaming (decode chunks forwarded; the route explanation rides the first)
               ⇄ migrating (the decode worker failed: the prompt plus the tokens already
                 streamed go to another decode worker, which fetches the prompt's blocks
                 from the KV store when a prefill worker stored them, recomputes the rest
                 and continues at the same (seed, position); at most ``migration_limit``
                 times)
             → finished | failed (WorkerFailed / DeadlineExceeded) | cancelled (the client left;
               closing the decode stream aborts the sequence on the worker)

A busy worker is not a dead one: only a transport failure (UNAVAILABLE, connection lost)
takes a worker out of rotation, for ``heartbeat_ttl_s``. A stalled or overloaded worker
loses the request (it is migrated) but stays in rotation.

Telemetry: each request is one span ``router.request`` (SERVER; the root unless the caller
sent a trace context) with children ``router.route`` (one per plan: decision, reason, every
candidate's score), ``router.admission`` and the CLIENT spans of the Prefill and Decode calls;
a migration is a ``pdserve.migration`` event on the root span. The prefill's trace rides on
to the decode call, so the decode's KV fetch is linked to the prefill that wrote the blocks.
Metrics and log lines: observe.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import structlog
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind

from pdserve.engine.block_hash import BlockKey, chain_block_keys, root_key
from pdserve.errors import (
    DeadlineExceeded,
    Failure,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    NoWorkers,
    Overloaded,
    PdserveError,
    WorkerCallError,
    WorkerFailed,
    quoted,
)
from pdserve.kv.blocks import Tier
from pdserve.kv.metadata import NodePrefix, WorkerInfo
from pdserve.telemetry import Attr, get_tracer, request_span
from pdserve.wire import KVSource
from services.router import admission, observe, policy
from services.router.affinity import PrefixAffinity
from services.router.messages import (
    CachedTokens,
    Chunk,
    DecodeCall,
    GenerateInput,
    ParsedRequest,
    PrefillCall,
    Prefilled,
    Route,
    RouteExplanation,
    Usage,
    WorkerChunk,
)
from services.router.settings import RouterSettings
from services.router.workers import WorkerClients, WorkerDirectory

log = structlog.get_logger(__name__)
_tracer = get_tracer("pdserve.router")
_MAX_DEADLINE_S = 24 * 3600
MAX_ID_CHARS = 256  # request_id, cache_salt, model, one stop string
MAX_STOP = 16
MAX_STOP_TOKEN_IDS = 256
CHAT_ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
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
        router_id: str = "",
    ) -> None:
        """``router_id``: the id this replica heartbeats under (its peers' are the others)."""
        self.settings = settings
        self.router_id = router_id
        self.model = model
        self.directory = directory
        self.clients = clients
        self.affinity = PrefixAffinity(settings.affinity_capacity_blocks)
        self.weights = policy.Weights(settings.overlap_weight, settings.load_weight)
        self.num_inflight = 0
        self._inflight: Counter[str] = Counter()  # worker id -> requests
        self._queued_tokens: Counter[str] = Counter()  # worker id -> prompt tokens to compute
        self._down_until: dict[str, float] = {}
        # decode worker id -> request id -> its remaining output and KV blocks (admission)
        self._decode_inflight: defaultdict[str, dict[str, admission.Inflight]] = defaultdict(dict)
        self.prefill_tokens_per_s = settings.prefill_tokens_per_s

    # ---- parsing ----

    def parse(self, inp: GenerateInput) -> ParsedRequest:
        if inp.model and inp.model != self.model.name:
            raise ModelNotFound(
                f"model {quoted(inp.model)} is not served here (available: {self.model.name!r})",
                param="model",
            )
        self._check_fields(inp)
        token_ids = self._tokenize(inp)
        if not token_ids:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        limit, max_tokens = self.model.max_model_len, inp.params.max_tokens
        if len(token_ids) + max_tokens > limit:
            raise InvalidRequest(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                f"the model's context of {limit} tokens",
                param="max_tokens" if len(token_ids) < limit else "prompt",
            )
        request_id = inp.request_id or new_request_id()
        return ParsedRequest(request_id, token_ids, inp.params, inp.cache_salt)

    def _check_fields(self, inp: GenerateInput) -> None:
        """Bounds on what both edges pass through as-is (ids, salts, roles, stop lists)."""
        for param, value in (("request_id", inp.request_id), ("cache_salt", inp.cache_salt)):
            if value is not None and len(value) > MAX_ID_CHARS:
                raise InvalidRequest(
                    f"{param} is {len(value)} characters; at most {MAX_ID_CHARS}", param=param
                )
        for i, message in enumerate(inp.messages or ()):
            if message.role not in CHAT_ROLES:
                raise InvalidRequest(
                    f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got "
                    f"{quoted(message.role)}",
                    param=f"messages.{i}.role",
                )
        params = inp.params
        if len(params.stop) > MAX_STOP or any(len(s) > MAX_ID_CHARS for s in params.stop):
            raise InvalidRequest(
                f"stop takes at most {MAX_STOP} strings of at most {MAX_ID_CHARS} characters",
                param="stop",
            )
        vocab = self.model.vocab_size
        if len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS or any(
            t >= vocab for t in params.stop_token_ids
        ):
            raise InvalidRequest(
                f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids in [0, {vocab})",
                param="stop_token_ids",
            )

    def _tokenize(self, inp: GenerateInput) -> list[int]:
        tokenizer = self.model.tokenizer
        if inp.prompt is not None:
            self._check_chars("prompt", len(inp.prompt))
            return tokenizer.encode(inp.prompt)
        if inp.messages is not None:
            if not inp.messages:
                raise InvalidRequest("messages must not be empty", param="messages")
            self._check_chars("messages", sum(len(m.content) for m in inp.messages))
            messages = [{"role": m.role, "content": m.content} for m in inp.messages]
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if inp.prompt_token_ids is not None:
            ids, vocab = inp.prompt_token_ids, self.model.vocab_size
            if len(ids) >= self.model.max_model_len:
                raise InvalidRequest(
                    f"prompt is {len(ids)} tokens; the model's context is "
                    f"{self.model.max_model_len}",
                    param="prompt",
                )
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequest(
                    f"prompt token ids must be in [0, {vocab}), got {bad}", param="prompt"
                )
            return list(ids)
        raise InvalidRequest("give one of prompt, messages or prompt_token_ids", param="prompt")

    def _check_chars(self, param: str, num_chars: int) -> None:
        limit = self.settings.max_input_chars
        if num_chars > limit:
            raise InvalidRequest(
                f"{param} is {num_chars} characters; at most {limit} are accepted", param=param
            )

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
        return [
            policy.worker_load(
                w.worker_id,
                w.load,
                self.settings.max_inflight_per_worker,
                own_inflight=self._inflight[w.worker_id],
                own_queued_tokens=self._queued_tokens[w.worker_id],
                cached_tokens=cached_tokens.get(w.worker_id, 0),
                min_output_tokens=min(
                    (r.num_output_tokens for r in self._decode_inflight[w.worker_id].values()),
                    default=0,
                ),
            )  # fmt: skip
            for w in workers
        ]

    def _costs(self) -> policy.CostModel | None:
        """The cost policy's priors (the prefill rate as observed so far); None: threshold."""
        s = self.settings
        if s.disaggregation_policy == "threshold":
            return None
        return policy.CostModel(
            prefill_tokens_per_s=self.prefill_tokens_per_s,
            decode_step_s=s.decode_step_s,
            handoff_s=s.handoff_s,
            handoff_s_per_token=s.handoff_s_per_token,
            tpot_slo_s=s.tpot_slo_s,
        )

    def _cached_tokens(
        self, keys, prefixes: Sequence[NodePrefix], decode, prefill
    ) -> dict[str, int]:
        bs = self.settings.block_size
        by_node = {p.node_id: p.num_blocks for p in prefixes}
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
        return cached

    def _plan(
        self,
        keys: Sequence[BlockKey],
        num_prompt_tokens: int,
        exclude_prefill: set[str],
        exclude_decode: set[str],
    ) -> Route | None:
        prefixes = tuple(self.directory.prefixes(keys))
        decode = [w for w in self._alive("decode") if w.worker_id not in exclude_decode]
        prefill = self._alive("prefill")
        cached = self._cached_tokens(keys, prefixes, decode, prefill)
        decode_loads, prefill_loads = self._loads(decode, cached), self._loads(prefill, cached)
        plan = policy.plan_route(
            decode_loads, prefill_loads, num_prompt_tokens, self.weights,
            self.settings.disagg_threshold_tokens, exclude_prefill, self._costs(),
        )  # fmt: skip
        if plan is None:
            return None
        infos = {w.worker_id: w for w in decode + prefill}
        scores = {
            role: {
                w.worker_id: round(policy.score(w, num_prompt_tokens, self.weights), 4)
                for w in loads
                if w.worker_id not in exclude_prefill
            }
            for role, loads in (("decode", decode_loads), ("prefill", prefill_loads))
        }
        prefill_info = infos[plan.prefill.worker_id] if plan.prefill else None
        return Route(plan, infos[plan.decode.worker_id], prefill_info, prefixes, scores)

    def _route(
        self,
        keys: Sequence[BlockKey],
        num_prompt_tokens: int,
        attempt: int,
        exclude_prefill: set[str] = frozenset(),
        exclude_decode: set[str] = frozenset(),
    ) -> Route | None:
        """:meth:`_plan` inside a ``router.route`` span that records the decision."""
        with _tracer.start_as_current_span("router.route") as span:
            route = self._plan(keys, num_prompt_tokens, set(exclude_prefill), set(exclude_decode))
            if route is None:
                span.set_attribute(Attr.ROUTE, "none")
            else:
                plan = route.plan
                span.set_attributes(observe.route_attributes(
                    plan, route.scores, plan.disaggregation.reason_class, attempt
                ))  # fmt: skip
        return route

    def _admit(
        self, route: Route, num_tokens: int, timeout_s: float, obs: observe.RequestObserver
    ) -> None:
        """Admission control inside ``router.admission``; raises Overloaded on a refusal.

        The predicted time to first token is the prefill queue's (the target's queued prompt
        tokens) plus the decode worker's wait for a batch slot and KV blocks for the whole
        ``num_tokens`` (prompt + max_tokens), from its reports (admission.py)."""
        plan = route.plan
        target = route.prefill or route.decode
        # The target's own report counts every router's prompts; ours is fresher for ours.
        reported = int(target.load.get("pending_prompt_tokens", 0))
        queued = max(self._queued_tokens[target.worker_id], reported)
        prefill_s = policy.predict_ttft_s(queued, plan.uncached_tokens, self.prefill_tokens_per_s)
        decode_wait_s = self._decode_wait_s(route.decode, num_tokens)
        ttft = prefill_s + decode_wait_s
        num_inflight = self.num_inflight + self._peer_inflight()
        attributes = {Attr.QUEUE: observe.ROUTER_QUEUE, "pdserve.admission.num_inflight":
                      num_inflight, "pdserve.admission.predicted_ttft_s": round(ttft, 4),
                      "pdserve.admission.decode_wait_s": round(decode_wait_s, 4)}  # fmt: skip
        with _tracer.start_as_current_span("router.admission", attributes=attributes) as span:
            verdict = policy.admit(
                num_inflight, self.settings.max_inflight_requests, ttft, timeout_s,
                queued, self.prefill_tokens_per_s,
            )  # fmt: skip
            span.set_attributes({
                "pdserve.admission.admitted": verdict.admitted,
                Attr.QUEUE_WAIT_S: round(time.monotonic() - obs.arrived, 6),
            })  # fmt: skip
            if not verdict.admitted:
                span.set_attribute("pdserve.admission.reason", verdict.reason_class)
                retry_after_s = max(verdict.retry_after_s, math.ceil(decode_wait_s))
                raise Overloaded(
                    verdict.reason, retry_after_s=retry_after_s,
                    reason_class=verdict.reason_class,
                )  # fmt: skip

    def _peer_inflight(self) -> int:
        """Requests the other router replicas have admitted, from their last heartbeats: the
        admission limit is the cluster's, whichever replica a request reaches."""
        return sum(
            int(w.load.get("running", 0))
            for w in self.directory.workers("router")
            if w.worker_id != self.router_id
        )

    def _decode_wait_s(self, worker: WorkerInfo, num_tokens: int) -> float:
        load, capacity = worker.load, worker.capacity
        free = load.get("num_free_blocks")
        state = admission.DecodeCapacity(
            max_num_seqs=int(capacity.get("max_num_seqs", self.settings.max_inflight_per_worker)),
            num_total_blocks=int(capacity.get("num_blocks", 0)),
            num_free_blocks=None if free is None else int(free),
            num_reported_seqs=int(load.get("running", 0) + load.get("waiting", 0)),
            step_s=float(load.get("step_s", 0.0)) or self.settings.decode_step_s,
            inflight=tuple(self._decode_inflight[worker.worker_id].values()),
        )
        needed = admission.blocks_needed(num_tokens, self.settings.block_size)
        wait_s = admission.decode_wait_s(state, needed)
        if wait_s is None:
            raise InvalidRequest(
                f"prompt + max_tokens ({num_tokens} tokens) needs {needed} KV blocks; decode "
                f"worker {worker.worker_id} holds {state.num_total_blocks}",
                param="max_tokens",
            )
        return wait_s

    # ---- serving ----

    async def generate(
        self,
        inp: GenerateInput,
        deadline_s: float | None = None,
        *,
        trace_context: otel_context.Context | None = None,
        on_admitted: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[Chunk]:
        """Stream one request's chunks; raises a PdserveError subclass on failure.

        ``trace_context``: the caller's (from gRPC metadata or HTTP headers), None for a new
        trace. ``on_admitted``: awaited once admission control has accepted the request
        (the HTTP edge sends its SSE headers then). Close the iterator
        (``contextlib.aclosing``) in the task that iterates it.
        """
        inp = inp if inp.request_id else _with_id(inp)
        attributes = observe.request_attributes(inp, self.model.name)
        with request_span(
            "router.request", inp.request_id, context=trace_context, kind=SpanKind.SERVER,
            **attributes,
        ) as span:  # fmt: skip
            obs = observe.RequestObserver(span)
            try:
                async for chunk in self._generate(inp, deadline_s, obs, on_admitted):
                    obs.chunk(chunk)
                    yield chunk
            except PdserveError as exc:
                obs.failed(exc)
                raise
            except Exception as exc:
                # The type only: an exception's text or locals may hold the prompt.
                log.error("router.internal_error", error_type=type(exc).__name__)
                failure = InternalError(f"internal error ({type(exc).__name__})")
                obs.failed(failure)
                raise failure from None
            except BaseException:  # GeneratorExit, CancelledError: the client left
                obs.cancelled()
                raise
            obs.finished()

    async def _generate(self, inp: GenerateInput, deadline_s, obs, on_admitted):
        parsed = self.parse(inp)
        n = len(parsed.prompt_token_ids)
        obs.parsed(n, parsed.params.max_tokens)
        timeout_s = min(deadline_s or self.settings.default_deadline_s, _MAX_DEADLINE_S)
        deadline = time.monotonic() + timeout_s
        keys = self._keys(parsed, parsed.prompt_token_ids)
        route = self._route(keys, n, attempt=1)
        if route is None:
            raise NoWorkers("no decode worker is available; is the stack up?")
        self._admit(route, n + parsed.params.max_tokens, timeout_s, obs)
        obs.admitted(n)
        self.num_inflight += 1
        try:
            if on_admitted is not None:
                await on_admitted()
            async for chunk in self._serve(parsed, keys, route, deadline, obs):
                yield chunk
        finally:
            self.num_inflight -= 1

    def _keys(self, parsed: ParsedRequest, token_ids: Sequence[int]) -> list[BlockKey]:
        root = root_key(self.model.fingerprint, parsed.cache_salt)
        return chain_block_keys(token_ids, self.settings.block_size, root)

    async def _serve(self, parsed, keys, route: Route, deadline, obs):
        """Prefill remotely when the plan says so, then stream the decode.

        A failed prefill (sequential or overlapped) is retried on another prefill worker, up
        to ``prefill_attempts`` in all; then the decode worker prefills locally."""
        excluded: set[str] = set()
        attempts, prefilled, reason_prefix, started = 0, None, "", None
        while route.prefill is not None:
            attempts += 1
            worker = route.prefill
            try:
                if self.settings.overlap_handoff:
                    started = await self._start_overlapped(
                        parsed, route, attempts, reason_prefix, deadline, obs
                    )
                else:
                    prefilled = await self._prefill(worker, parsed, route.plan, deadline)
                break
            except WorkerCallError as exc:
                reason_prefix += f"prefill on {worker.worker_id} failed ({exc.failure.value}); "
                route = self._after_failed_prefill(parsed, keys, worker, exc, excluded, attempts,
                                                   deadline)  # fmt: skip
        if started is not None:
            async with contextlib.aclosing(started):
                async for chunk in started:
                    yield chunk
            return
        failed_over = bool(reason_prefix) and route.prefill is None
        plan = route.plan
        obs.routed(plan, policy.PREFILL_FAILED if failed_over else plan.disaggregation.reason_class)
        explanation = self._explain(route, prefilled, attempts, reason_prefix)
        async for chunk in self._decode(parsed, route, prefilled, explanation, deadline, obs):
            yield chunk

    def _after_failed_prefill(
        self, parsed, keys, worker: WorkerInfo, exc: WorkerCallError, excluded: set[str],
        attempts: int, deadline: float,
    ) -> Route:  # fmt: skip
        """The next route after a prefill on ``worker`` failed: another prefill worker, or the
        decode worker alone once ``prefill_attempts`` are spent; raises when none is left."""
        if exc.failure is Failure.INVALID:
            raise InvalidRequest(exc.message) from None
        log.warning("router.prefill_failed", worker=worker.worker_id, failure=exc.failure.value,
                    error=exc.message)  # fmt: skip
        if exc.failure is Failure.UNAVAILABLE:
            self._mark_down(worker.worker_id)  # gone: the next requests go elsewhere
        excluded.add(worker.worker_id)
        self._check_deadline(deadline, "prefill")
        if attempts >= self.settings.prefill_attempts:
            excluded |= {w.worker_id for w in self.directory.workers("prefill")}
        n = len(parsed.prompt_token_ids)
        route = self._route(keys, n, attempts + 1, exclude_prefill=excluded)
        if route is None:
            raise NoWorkers("no decode worker is available") from None
        return route

    async def _prefill(self, worker, parsed, plan, deadline, call_id: str = "") -> Prefilled:
        call = PrefillCall(
            call_id or parsed.request_id, parsed.prompt_token_ids, parsed.params,
            parsed.cache_salt,
        )  # fmt: skip
        wid = worker.worker_id
        self._inflight[wid] += 1
        self._queued_tokens[wid] += plan.uncached_tokens
        started = time.monotonic()
        try:
            timeout = min(self.settings.prefill_timeout_s, self._remaining(deadline, "prefill"))
            prefilled = await self.clients.prefill(worker.address, call, timeout)
        finally:
            self._inflight[wid] -= 1
            self._queued_tokens[wid] -= plan.uncached_tokens
        self._observe_rate(prefilled.num_computed_tokens, time.monotonic() - started)
        return prefilled

    def _observe_rate(self, num_tokens: int, elapsed_s: float) -> None:
        self.prefill_tokens_per_s = policy.observe_prefill_rate(
            self.prefill_tokens_per_s, num_tokens, elapsed_s
        )

    async def _start_overlapped(self, parsed, route: Route, attempt, reason_prefix, deadline, obs):
        """Start Prefill and the Decode that follows it together (the decode worker reserves
        its blocks, pulls each one as the prefill seals it and takes the first token from it).

        Returns the decode stream with its first chunk in hand. When the prefill fails before
        that chunk, the decode call is cancelled and the prefill's WorkerCallError raised, so
        :meth:`_serve` starts both again with another prefill worker rather than leaving the
        decode worker to recompute the whole prompt next to its running batch. A retry gets
        a call id of its own (the decode worker may still hold the abandoned one)."""
        call_id = parsed.request_id if attempt == 1 else f"{parsed.request_id}.p{attempt}"
        prefill = asyncio.create_task(
            self._prefill(route.prefill, parsed, route.plan, deadline, call_id)
        )
        obs.routed(route.plan, route.plan.disaggregation.reason_class)
        explanation = self._explain(route, None, attempt, reason_prefix)
        call = dataclasses.replace(
            self._decode_call(parsed, None), request_id=call_id,
            prefill_address=route.prefill.address,
        )  # fmt: skip
        stream = self._decode(parsed, route, None, explanation, deadline, obs, call,
                              stored_kv=lambda: _stored_kv(prefill))  # fmt: skip
        first = asyncio.create_task(_first_item(stream))
        try:
            await asyncio.wait((prefill, first), return_when=asyncio.FIRST_COMPLETED)
            if not first.done() and prefill.exception() is not None:
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
                # The cancelled call reserved blocks that it never filled: not a cached prefix.
                self.affinity.forget(
                    route.decode.worker_id, self._keys(parsed, call.prompt_token_ids)
                )
                raise prefill.exception()
            chunk = await first
        except BaseException:
            prefill.cancel()
            first.cancel()
            await asyncio.gather(prefill, first, return_exceptions=True)
            await stream.aclose()
            raise
        # The stream has its first token; a prefill still running is no longer needed.
        prefill.add_done_callback(self._late_prefill(route.prefill.worker_id))
        return _continue(chunk, stream, prefill)

    def _late_prefill(self, worker_id: str) -> Callable[[asyncio.Task], None]:
        def done(task: asyncio.Task) -> None:
            if task.cancelled():
                return
            exc = task.exception()
            if isinstance(exc, WorkerCallError) and exc.failure is Failure.UNAVAILABLE:
                self._mark_down(worker_id)

        return done

    def _decode_call(self, parsed, prefilled, resume_token_ids=()) -> DecodeCall:
        return DecodeCall(
            request_id=parsed.request_id,
            prompt_token_ids=parsed.prompt_token_ids,
            params=parsed.params,
            cache_salt=parsed.cache_salt,
            prefilled=prefilled,
            resume_token_ids=tuple(resume_token_ids),
            kv_fetch_timeout_s=self.settings.kv_fetch_timeout_s,
        )

    # ---- decoding and migration ----

    async def _decode(
        self, parsed, route: Route, prefilled, explanation, deadline, obs, call=None,
        stored_kv: Callable[[], KVSource | None] | None = None,
    ):  # fmt: skip
        """Forward the decode stream; when its worker fails, continue on another one.

        ``streamed``: every token id already yielded to the client, in order. A migrated
        call resumes after exactly those, so nothing is lost or repeated. ``stored_kv``: where
        a prefill worker stored the prompt's blocks (default: ``prefilled.kv``); a migrated
        call fetches them rather than recomputing the prompt."""
        streamed: list[int] = []
        call = call or self._decode_call(parsed, prefilled)
        kv = prefilled.kv if prefilled is not None else None
        stored_kv = stored_kv or (lambda: kv)
        tried: list[str] = []
        plan = route.plan
        # Disaggregated: the cached prompt tokens are what the prefill did not compute.
        cached = plan.num_prompt_tokens - explanation.uncached_tokens if prefilled else None
        while True:
            tried.append(route.decode.worker_id)
            num_resumed = len(streamed)
            try:
                async for chunk in self._stream(route, call, deadline):
                    streamed.extend(chunk.token_ids)
                    first = explanation if len(streamed) == len(chunk.token_ids) else None
                    yield _client_chunk(parsed.request_id, chunk, first, num_resumed, cached)
                return
            except WorkerCallError as exc:
                route = self._migration_route(parsed, exc, streamed, tried, deadline, obs)
            # An id of its own: a worker frees the abandoned call's id only once its abort
            # lands, and the retry may go to that very worker.
            call = dataclasses.replace(
                self._decode_call(parsed, None, streamed),
                request_id=f"{parsed.request_id}.{len(tried)}", kv=stored_kv(),
            )  # fmt: skip
            prefilled, cached = None, None

    def _migration_route(self, parsed, exc: WorkerCallError, streamed, tried, deadline, obs):
        """Where a failed decode goes next; raises when it cannot go anywhere."""
        wid = tried[-1]
        if exc.failure is Failure.INVALID:
            raise InvalidRequest(exc.message) from None
        self._check_deadline(deadline, "decode")
        if exc.failure is Failure.UNAVAILABLE:  # the worker is gone, not just this request
            self._mark_down(wid)
        failed = (
            f"decode worker {wid} failed ({exc.failure.value}) after {len(streamed)} tokens: "
            f"{exc.message}"
        )
        log.warning("router.decode_failed", worker=wid, failure=exc.failure.value,
                    streamed_tokens=len(streamed))  # fmt: skip
        if len(tried) > self.settings.migration_limit:
            raise WorkerFailed(f"{failed}; migration limit {self.settings.migration_limit} reached")
        token_ids = parsed.prompt_token_ids + streamed
        keys, n = self._keys(parsed, token_ids), len(token_ids)
        no_prefill = {w.worker_id for w in self.directory.workers("prefill")}
        attempt = len(tried) + 1
        route = self._route(keys, n, attempt, no_prefill, set(tried))
        if route is None:  # nobody else: the same worker again, unless it is down
            route = self._route(keys, n, attempt, no_prefill)
        if route is None:
            raise WorkerFailed(f"{failed}; no other decode worker to continue on")
        obs.migrated(exc.failure.value, wid, route.decode.worker_id, len(streamed))
        return route

    async def _stream(
        self, route: Route, call: DecodeCall, deadline: float
    ) -> AsyncIterator[WorkerChunk]:
        worker = route.decode
        wid = worker.worker_id
        self.affinity.record(wid, self._keys(call, call.prompt_token_ids))
        # A prompt prefilled elsewhere arrives as KV (sequential or overlapped handoff): it
        # queues on the prefill worker only.
        queued = route.plan.uncached_tokens if route.prefill is None else 0
        self._inflight[wid] += 1
        self._queued_tokens[wid] += queued
        remaining = call.params.max_tokens - len(call.resume_token_ids)
        num_tokens = len(call.prompt_token_ids) + call.params.max_tokens
        blocks = admission.blocks_needed(num_tokens, self.settings.block_size)
        held = self._decode_inflight[wid]
        held[call.request_id] = admission.Inflight(remaining, blocks, call.params.max_tokens)
        try:
            stream = self.clients.decode(worker.address, call, self._remaining(deadline, "decode"))
            # Overlapped: the first chunk waits for the prefill the decode worker follows.
            first_s = self.settings.decode_first_chunk_timeout_s + (
                self.settings.prefill_timeout_s if call.prefill_address else 0.0
            )
            async for chunk in self._paced(stream, deadline, wid, first_s):
                self._queued_tokens[wid] -= queued
                queued = 0
                remaining -= len(chunk.token_ids)
                held[call.request_id] = admission.Inflight(
                    remaining, blocks, call.params.max_tokens
                )
                yield chunk
        finally:
            self._inflight[wid] -= 1
            self._queued_tokens[wid] -= queued
            held.pop(call.request_id, None)

    async def _paced(self, stream, deadline: float, wid: str, first_chunk_timeout_s: float):
        """Forward chunks; a stream silent past the stall timeout fails with Failure.STALL."""
        first = True
        try:
            while True:
                limit = first_chunk_timeout_s if first else self.settings.decode_stall_timeout_s
                wait_s = min(limit, self._remaining(deadline, "decode"))
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), wait_s)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    self._check_deadline(deadline, "decode")
                    raise WorkerCallError(
                        Failure.STALL, f"decode worker {wid} sent nothing for {wait_s:.1f}s"
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

    def _explain(self, route: Route, prefilled, attempts, reason_prefix) -> RouteExplanation:
        bs, plan = self.settings.block_size, route.plan
        cached = tuple(
            CachedTokens(
                node_id=p.node_id,
                hbm=p.num_blocks_by_tier.get(Tier.HBM, 0) * bs,
                dram=p.num_blocks_by_tier.get(Tier.DRAM, 0) * bs,
                ssd=p.num_blocks_by_tier.get(Tier.SSD, 0) * bs,
            )
            for p in route.prefixes
        )
        uncached = prefilled.num_computed_tokens if prefilled is not None else plan.uncached_tokens
        return RouteExplanation(
            prefill_worker=plan.prefill.worker_id if plan.prefill else "",
            decode_worker=plan.decode.worker_id,
            disaggregated=plan.prefill is not None,
            reason=reason_prefix + plan.disaggregation.reason,
            prompt_tokens=plan.num_prompt_tokens,
            uncached_tokens=uncached,
            cached=cached,
            decode_score=plan.decode.score,
            prefill_score=plan.prefill.score if plan.prefill else 0.0,
            prefill_attempts=attempts,
            predicted_local_ttft_s=plan.disaggregation.predicted_local_ttft_s or 0.0,
            predicted_remote_ttft_s=plan.disaggregation.predicted_remote_ttft_s or 0.0,
        )

    def stats(self) -> dict:
        return {
            "num_inflight": self.num_inflight,
            "prefill_workers": len(self._alive("prefill")),
            "decode_workers": len(self._alive("decode")),
            "redis_ok": self.directory.redis_ok,
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 1),
        }


def _client_chunk(
    request_id: str,
    chunk: WorkerChunk,
    route: RouteExplanation | None,
    num_resumed: int,
    cached_tokens: int | None,
) -> Chunk:
    """A worker's chunk as the client sees it: usage counts every output token of the
    request (the resumed ones too) and ``cached_tokens`` never exceeds the prompt."""
    usage = chunk.usage
    if usage is not None:
        cached = usage.cached_tokens if cached_tokens is None else cached_tokens
        usage = Usage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens + num_resumed,
            cached_tokens=min(cached, usage.prompt_tokens),
        )
    return Chunk(
        request_id=request_id,
        text=chunk.text,
        token_ids=chunk.token_ids,
        logprobs=chunk.logprobs,
        finish_reason=chunk.finish_reason,
        usage=usage,
        route=route,
    )


def _stored_kv(prefill: asyncio.Task) -> KVSource | None:
    """Where the overlapped prefill stored the prompt's blocks, once it has succeeded."""
    if prefill.done() and not prefill.cancelled() and prefill.exception() is None:
        return prefill.result().kv
    return None


async def _first_item(stream: AsyncIterator[Chunk]) -> Chunk:
    """The stream's first chunk (a task of its own, raced against the prefill)."""
    async for chunk in stream:
        return chunk
    raise WorkerFailed("the decode worker ended the stream without a token")


async def _continue(
    first: Chunk, stream: AsyncIterator[Chunk], prefill: asyncio.Task
) -> AsyncIterator[Chunk]:
    try:
        yield first
        async for chunk in stream:
            yield chunk
    finally:
        prefill.cancel()
        await stream.aclose()


def _with_id(inp: GenerateInput) -> GenerateInput:
    return dataclasses.replace(inp, request_id=new_request_id())


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"
