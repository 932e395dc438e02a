"""The prefill worker: batched prompt passes whose KV blocks are handed to the kvstore.

Lifecycle of a request (:class:`PrefillState`)::

    LOADING (fetch pool: Lookup in the node's kvstore, Get the stored prefix)
      → COMPUTING (engine thread: prefix imported, prompt queued, chunked prefill steps;
                   each step's completed blocks stream to the kvstore layer by layer)
      → HANDING_OFF (first token sampled; waiting for the last blocks to be sealed)
      → DONE | ABORTED (cancelled, deadline) | FAILED

Invariants:
- The engine is driven by one thread (``engine-prefill``); other threads hand it work with
  ``_inbox.call_soon`` and never touch it (except ``LLMEngine.cached_prefix_blocks``, a hint).
- KV leaves the engine only through its KV-connector seam: the worker is the engine's
  ``KVSaver`` (``begin_save`` picks the blocks the kvstore lacks, ``save_layer`` queues each
  layer's slices for the handoff thread, ``end_save`` seals or drops them).
- Every full block of the prompt is in the kvstore when DONE, except blocks whose write
  failed; the returned KVSource lists the longest stored prefix, so a reader never looks for
  a block that is not there.
- Aborting a request frees its engine blocks at once (``LLMEngine.abort``); blocks already
  sealed in the kvstore stay (they are correct, and reusable by the next prompt).

Telemetry (spans under the request context handed to ``submit``; contextvars do not cross
threads, so each job carries it): ``prefill.load_prefix`` (LOADING), ``prefill.queue``
(admitted → first scheduled), ``prefill.compute`` (first scheduled → first token: prompt,
cached and computed tokens), ``prefill.batch`` per engine step (child of its first request's
compute span, linked to the others'), ``kv.put`` per handoff step (handoff.py) and
``prefill.handoff`` (first token → every block sealed). Every span is ended on every path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import itertools
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import NamedTuple

import structlog
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from pdserve import metrics
from pdserve.engine.kv_connector import KVSaver, SaveBlock
from pdserve.engine.llm_engine import RequestOutput
from pdserve.engine.sampler import SampledToken
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import SchedulerPlan
from pdserve.kv.grpc_transport import GrpcTransport, SharedMemoryTransport
from pdserve.kv.metadata import RedisLayout, WorkerRegistry, connect_for
from pdserve.kv.transport import KVTransport
from pdserve.model.loader import Checkpoint
from pdserve.telemetry import Attr, extract_context, get_tracer, inject_context
from pdserve.tls import ClusterSecurity
from pdserve.wire import KVSource
from services.engine_worker import EngineWorker, OverloadedError, Registry  # noqa: F401 - re-exported for the server
from services.prefill.handoff import KVHandoff, LayerGroup
from services.prefill.settings import PrefillSettings

log = structlog.get_logger(__name__)
tracer = get_tracer(__name__)
_NUM_RECENT = 256  # settled requests a late follow() can still read


class PrefillState(enum.Enum):
    LOADING = "loading"
    COMPUTING = "computing"
    HANDING_OFF = "handing_off"
    DONE = "done"
    ABORTED = "aborted"
    FAILED = "failed"


class CancelledError(RuntimeError):
    """The request was cancelled or ran past its deadline."""


class DeadlineExceededError(CancelledError):
    pass


@dataclasses.dataclass(frozen=True)
class PrefillResult:
    first_token: SampledToken
    kv: KVSource
    num_prompt_tokens: int
    num_cached_tokens: int  # loaded from a cache (kvstore or the worker's own) instead of computed
    num_computed_tokens: int
    worker_id: str
    trace_context: dict[str, str] = dataclasses.field(default_factory=dict)  # the request span


class HandoffUpdate(NamedTuple):
    """One step of ``PrefillWorker.follow``: the sealed prefix of the prompt's block keys, the
    result (last update only), the request's trace context, and the layer groups of its
    blocks written to staging slots since the previous update."""

    keys: tuple[bytes, ...]
    result: PrefillResult | None
    trace: dict[str, str]
    layers: tuple[LayerGroup, ...] = ()


@dataclasses.dataclass(eq=False)
class _Job:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    cache_salt: str | None
    keys: list[bytes]  # chain keys of every full block of the prompt
    deadline: float | None  # time.monotonic()
    future: Future = dataclasses.field(default_factory=Future)
    state: PrefillState = PrefillState.LOADING
    stored: set[bytes] = dataclasses.field(default_factory=set)  # in the kvstore at lookup
    block_futures: dict[bytes, Future] = dataclasses.field(default_factory=dict)
    trace_context: dict[str, str] = dataclasses.field(default_factory=dict)  # the RPC's span
    admitted_ns: int = 0  # time.time_ns() when queued in the engine
    admitted_at: float = 0.0  # time.monotonic(), same moment
    compute_span: trace.Span | None = None
    handoff_span: trace.Span | None = None
    watchers: list[queue.SimpleQueue] = dataclasses.field(default_factory=list)  # follow()
    layer_groups: list[LayerGroup] = dataclasses.field(default_factory=list)  # appended only

    def notify(self) -> None:
        """Wake every ``follow`` of this job (any thread)."""
        for watcher in list(self.watchers):
            watcher.put(None)

    def sealed_keys(self) -> tuple[bytes, ...]:
        """The leading keys of the prompt that the kvstore holds now."""
        sealed = []
        for key in self.keys:
            fut = self.block_futures.get(key)
            if key not in self.stored and not (fut is not None and fut.done() and fut.result()):
                break
            sealed.append(key)
        return tuple(sealed)

    def context(self) -> dict[str, str]:
        """The innermost open span of this job, for children made on other threads."""
        span = self.handoff_span or self.compute_span
        return inject_context(trace.set_span_in_context(span)) if span else self.trace_context

    def settle(self, state: PrefillState, result=None, error: Exception | None = None) -> None:
        _end_spans(self, error)
        self.state = state
        with contextlib.suppress(InvalidStateError):
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
        self.notify()


@dataclasses.dataclass(frozen=True)
class PrefillLoad:
    """A snapshot the engine thread publishes after every iteration (read by Stats/heartbeat)."""

    running: int = 0
    waiting: int = 0
    num_free_blocks: int = 0
    num_prompt_tokens_computed: int = 0
    num_prompt_tokens_cached: int = 0
    step_ms: float = 0.0  # the last engine step's wall time (the console shows it)
    pending_prompt_tokens: int = 0  # prompt tokens queued or mid-prefill here


class KVConnection:
    """A lazily (re)built transport to one kvstore; thread-safe. ``make`` builds it (a gRPC or
    shared-memory client; an in-process store's transport in tests and embedded use)."""

    def __init__(self, make: Callable[[], KVTransport]) -> None:
        self._make = make
        self._transport: KVTransport | None = None
        self._lock = threading.Lock()

    @classmethod
    def to_kvstore(cls, settings: PrefillSettings) -> KVConnection:
        """The node's kvstore from the settings: shared memory when allowed, else gRPC."""
        kind = SharedMemoryTransport if settings.kv_transport == "auto" else GrpcTransport
        security = ClusterSecurity.from_settings(settings)
        return cls(
            lambda: kind(
                settings.kvstore_address, timeout_s=settings.kv_timeout_s, security=security
            )
        )

    def get(self) -> KVTransport:
        with self._lock:
            if self._transport is None:
                self._transport = self._make()
            return self._transport

    def reset(self) -> None:
        """Forget the transport after an error (the store may have restarted with a new segment)."""
        with self._lock:
            self._transport = None

    def close(self) -> None:
        with self._lock:
            if self._transport is not None:
                self._transport.close()
            self._transport = None


class PrefillWorker(EngineWorker, KVSaver):
    role = "prefill"

    def __init__(
        self,
        settings: PrefillSettings,
        *,
        checkpoint: Checkpoint | None = None,
        worker_id: str,
        address: str,
        kv: KVConnection | None = None,
        registry: Registry | None = None,
    ) -> None:
        """``kv`` and ``registry`` default to the kvstore and the Redis registry the settings
        name; pass others (an in-process store, an in-memory registry) to run without them."""
        self._num_cached = 0
        self._recent: OrderedDict[str, Future] = OrderedDict()  # settled jobs, for follow()
        self._step_started_ns = 0
        self._batch_span: trace.Span | None = None
        registry = registry or WorkerRegistry(
            connect_for(settings), RedisLayout(settings.cluster_name), settings.heartbeat_ttl_s
        )
        super().__init__(
            settings, checkpoint=checkpoint, worker_id=worker_id, address=address,
            registry=registry,
        )  # fmt: skip
        self._jobs_changed = threading.Condition(self._lock)
        self.kv = kv or KVConnection.to_kvstore(settings)
        num_layers = self.engine.model_config.num_layers
        self.handoff = KVHandoff(
            self.kv.get, self.engine.layer_nbytes, node_id=settings.kv_node_id,
            num_layers=num_layers,
            group_layers=-(-num_layers // max(1, settings.handoff_layer_groups)),
        )  # fmt: skip
        self.engine.kv_saver = self
        self._fetch_pool = ThreadPoolExecutor(4, thread_name_prefix="prefill-fetch")

    # ---- lifecycle ----

    def start(self) -> None:
        self.handoff.start()
        super().start()

    def _close(self) -> None:
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        self.handoff.stop()
        self.kv.close()

    def _capacity(self) -> dict[str, int]:
        return {
            "num_blocks": self.engine.num_kv_blocks,
            "max_num_batched_tokens": self.settings.engine.max_num_batched_tokens,
        }

    # ---- the API (any thread) ----

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        request_id: str,
        cache_salt: str | None = None,
        timeout_s: float | None = None,
        trace_context: dict[str, str] | None = None,
    ) -> Future:
        """Start a prefill; the future resolves to a :class:`PrefillResult` or raises
        CancelledError / DeadlineExceededError / RuntimeError.

        Raises ValueError for a bad prompt and OverloadedError when the queue is full.
        ``trace_context`` (``inject_context()`` of the caller's span) parents the job's spans."""
        if not request_id:
            raise ValueError("request_id must not be empty")
        prompt = self.engine.encode_prompt(list(prompt))
        self.engine.validate_prompt(prompt, dataclasses.replace(params, max_tokens=1))
        num_full = len(prompt) // self.block_size
        keys = self.engine.block_keys(prompt[: num_full * self.block_size], cache_salt)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        job = _Job(request_id, prompt, params, cache_salt, list(keys), deadline)
        job.trace_context = dict(trace_context or {})
        self._register(request_id, job)
        job.future.add_done_callback(lambda _: self._forget(job))
        self._fetch_pool.submit(self._load_prefix, job)
        return job.future

    def cancel(self, request_id: str) -> None:
        """Abort a request in any state; its engine blocks are freed at once."""
        self._inbox.call_soon(lambda: self._abort(request_id, CancelledError("cancelled")))

    def _on_registered(self) -> None:
        self._jobs_changed.notify_all()  # a follow() may be waiting for this request

    def _forget(self, job: _Job) -> None:
        with self._lock:
            if self._jobs.get(job.request_id) is job:
                del self._jobs[job.request_id]
            self._recent[job.request_id] = job.future
            while len(self._recent) > _NUM_RECENT:
                self._recent.popitem(last=False)

    def follow(self, request_id: str, wait_s: float) -> Iterator[HandoffUpdate]:
        """The overlapped handoff, from the decode side (blocking; any thread).

        Yields a :class:`HandoffUpdate` each time the sealed prefix of the prompt's block keys
        grows or layer groups of its blocks were written, then one with every stored key and
        the result. The trace context names the prefill's request span, which the decode's KV
        fetches link to.
        Raises the prefill's own error, or KeyError when no such request arrives within
        ``wait_s`` (the decode may ask before the Prefill call lands; a request that already
        ended is answered from the last few)."""
        job, done = self._find(request_id, wait_s)
        if done is not None:
            result = done.result()
            yield HandoffUpdate(result.kv.block_keys, result, result.trace_context)
            return
        watcher: queue.SimpleQueue = queue.SimpleQueue()
        job.watchers.append(watcher)
        try:
            num_sealed, num_groups = -1, 0
            while not job.future.done():
                keys = job.sealed_keys()
                groups = tuple(job.layer_groups[num_groups:])
                if len(keys) > num_sealed or groups:
                    num_sealed, num_groups = max(num_sealed, len(keys)), num_groups + len(groups)
                    yield HandoffUpdate(keys, None, job.trace_context, groups)
                with contextlib.suppress(queue.Empty):
                    watcher.get(timeout=1.0)
            result = job.future.result()
            groups = tuple(job.layer_groups[num_groups:])  # the last one may come with the end
            yield HandoffUpdate(result.kv.block_keys, result, job.trace_context, groups)
        finally:
            job.watchers.remove(watcher)

    def _find(self, request_id: str, wait_s: float) -> tuple[_Job | None, Future | None]:
        deadline = time.monotonic() + wait_s
        with self._jobs_changed:
            while True:
                job = self._jobs.get(request_id)
                if job is not None or request_id in self._recent:
                    return job, None if job is not None else self._recent[request_id]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise KeyError(f"no prefill of request {request_id!r} within {wait_s:g}s")
                self._jobs_changed.wait(remaining)

    # ---- LOADING (fetch pool) ----

    def _load_prefix(self, job: _Job) -> None:
        """Which blocks does the kvstore hold? Fetch the stored prefix we lack."""
        first, payloads = 0, []
        with (
            tracer.start_as_current_span(
                "prefill.load_prefix",
                context=extract_context(job.trace_context),
                attributes={Attr.REQUEST_ID: job.request_id, Attr.KV_DIRECTION: "get"},
            ) as span,
            structlog.contextvars.bound_contextvars(request_id=job.request_id),
        ):
            try:
                first, payloads = self._fetch_stored_prefix(job, span)
            except Exception as exc:  # noqa: BLE001 - the kvstore is an optimization here
                log.warning("prefill.kv_lookup_failed", error=str(exc))
                span.set_status(Status(StatusCode.ERROR, f"kv lookup failed: {exc}"))
                self.kv.reset()
                job.stored, payloads = set(), []
        self._inbox.call_soon(lambda: self._admit(job, first, payloads))

    def _fetch_stored_prefix(self, job: _Job, span: trace.Span) -> tuple[int, list]:
        """(blocks found in our own cache, payloads fetched from the kvstore after them)."""
        usable = (len(job.prompt) - 1) // self.block_size  # the last token is always computed
        first, payloads = 0, []
        kv = self.kv.get()
        lookup = kv.lookup(job.keys) if job.keys else None
        if lookup is None:
            return first, payloads
        job.stored = {k for k, t in zip(job.keys, lookup.tiers, strict=True) if t}
        usable = min(usable, lookup.prefix_blocks)
        first = self.engine.cached_prefix_blocks(job.keys[:usable])  # a hint (module docstring)
        if first < usable:
            got = kv.get_blocks(job.keys[first:usable], trace_context=inject_context())
            payloads = list(itertools.takewhile(lambda b: b is not None, got))
        tiers = lookup.tiers[first : first + len(payloads)]
        _count_prefix_hits(first, tiers, self.block_size)
        span.set_attributes({
            Attr.KV_BLOCKS: len(payloads), Attr.KV_BYTES: sum(len(b) for b in payloads),
            Attr.KV_TIER: tiers[0].label if tiers and tiers[0] else "none",
            Attr.KV_TRANSPORT: kv.kind,
            Attr.KV_NODE: self.settings.kv_node_id,
            Attr.CACHED_TOKENS: (first + len(payloads)) * self.block_size,
        })  # fmt: skip
        return first, payloads

    # ---- engine thread ----

    def _admit(self, job: _Job, first: int, payloads: list) -> None:
        metrics.PREFIX_CACHE_QUERY_TOKENS.inc(len(job.prompt))
        if job.state is not PrefillState.LOADING:
            return  # aborted while loading
        bs = self.block_size
        try:
            if payloads:
                keys = job.keys[first : first + len(payloads)]
                self.engine.import_blocks(job.prompt[first * bs :], keys, payloads)
            self.engine.add_request(
                job.prompt,
                dataclasses.replace(job.params, max_tokens=1),
                request_id=job.request_id,
                cache_salt=job.cache_salt,
            )
        except ValueError as exc:
            job.settle(PrefillState.FAILED, error=exc)
            return
        job.state = PrefillState.COMPUTING
        job.admitted_ns, job.admitted_at = time.time_ns(), time.monotonic()

    def _abort(self, request_id: str, error: Exception) -> None:
        job = self._jobs.get(request_id)
        if job is None or job.state in (PrefillState.DONE, PrefillState.FAILED):
            return
        if job.state is PrefillState.COMPUTING:
            self.engine.abort(request_id)
        job.settle(PrefillState.ABORTED, error=error)

    def _shut_down_jobs(self) -> None:
        for job in self._snapshot_jobs():
            self._abort(job.request_id, CancelledError("the prefill worker is shutting down"))

    def _expire(self) -> None:
        now = time.monotonic()
        for job in self._snapshot_jobs():
            if job.deadline is not None and now > job.deadline:
                self._abort(job.request_id, DeadlineExceededError("deadline exceeded"))

    def _step(self) -> None:
        self._step_started_ns = time.time_ns()
        super()._step()

    def _step_failed(self, error: Exception) -> None:
        self._end_batch_span(error)
        for job in self._snapshot_jobs():
            if job.state is PrefillState.COMPUTING:
                self.engine.abort(job.request_id)
                job.settle(PrefillState.FAILED, error=RuntimeError(f"prefill failed: {error}"))

    def _on_outputs(self, outputs: Sequence[RequestOutput]) -> None:
        self._end_batch_span(None)
        for out in outputs:
            self._on_output(out)

    def _on_layer_done(self, layer: int, plan: SchedulerPlan) -> None:
        if layer == 0:
            self._trace_step(plan)

    # ---- the engine's KVSaver (engine thread) ----

    def begin_save(self, blocks: Sequence[SaveBlock]) -> list[SaveBlock]:
        """Pick the blocks this step completes that the kvstore lacks and nobody is writing;
        every job of the step that needs one of them waits on its future."""
        picked: dict[bytes, SaveBlock] = {}  # key -> block, in write order
        needs: list[tuple[_Job, bytes]] = []
        for block in blocks:
            job = self._jobs.get(block.request_id)
            if job is None or block.index >= len(job.keys):
                continue
            key = block.key
            if key in job.stored or key in job.block_futures:
                continue
            pending = self.handoff.inflight(key)
            if pending is not None:
                job.block_futures[key] = pending
                continue
            picked.setdefault(key, block)  # shared by two prompts: written once
            needs.append((job, key))
        if picked:
            contexts = list({id(job): job for job, _ in needs}.values())
            listener = _layer_listener(needs) if self.settings.handoff_layer_groups else None
            begun = self.handoff.begin_step(
                list(picked), [job.context() for job in contexts], listener
            )
            futures = dict(zip(picked, begun, strict=True))
            for job, key in needs:
                job.block_futures[key] = futures[key]
            for job in contexts:
                _notify_when_done(job, [futures[key] for j, key in needs if j is job])
        return list(picked.values())

    def save_layer(self, layer: int, payloads: Sequence[bytes]) -> None:
        self.handoff.write_layer(layer, payloads)

    def end_save(self, error: Exception | None) -> None:
        if error is None:
            self.handoff.end_step()
        else:
            self.handoff.abort_step()

    def _on_output(self, out: RequestOutput) -> None:
        job = self._jobs.get(out.request_id)
        if job is None or job.state is not PrefillState.COMPUTING:
            return
        if out.finish_reason == "error" or not out.new_token_ids:
            job.settle(PrefillState.FAILED, error=RuntimeError("the prompt could not be scheduled"))
            return
        token = (
            out.new_logprobs[0]
            if out.new_logprobs
            else SampledToken(out.new_token_ids[0], None, None)
        )
        self._num_cached += out.num_cached_tokens
        self._end_compute(job, out.num_cached_tokens)
        job.state = PrefillState.HANDING_OFF
        job.handoff_span = tracer.start_span(
            "prefill.handoff",
            context=extract_context(job.trace_context),
            attributes={Attr.REQUEST_ID: job.request_id, Attr.KV_NODE: self.settings.kv_node_id},
        )
        self._put_missing(job)
        result = dict(first_token=token, num_cached_tokens=out.num_cached_tokens)
        _when_all(list(job.block_futures.values()), lambda: self._complete(job, **result))

    def _put_missing(self, job: _Job) -> None:
        """Blocks served from our own cache that the kvstore lacks: export and write them."""
        missing = []
        for key in job.keys:
            if key in job.stored or key in job.block_futures:
                continue
            pending = self.handoff.inflight(key)
            if pending is not None:
                job.block_futures[key] = pending
            else:
                missing.append(key)
        if not missing:
            return
        try:
            payloads = self.engine.export_blocks(missing)
        except KeyError:
            return  # evicted meanwhile: the KVSource prefix ends before them
        futures = self.handoff.put_whole(list(zip(missing, payloads, strict=True)), [job.context()])
        job.block_futures.update(zip(missing, futures, strict=True))
        _notify_when_done(job, futures)

    def _complete(self, job: _Job, first_token: SampledToken, num_cached_tokens: int) -> None:
        """Runs on whichever thread resolved the last block future."""
        stored = []
        for key in job.keys:
            fut = job.block_futures.get(key)
            if key in job.stored or (fut is not None and fut.result()):
                stored.append(key)
            else:
                break
        kv = KVSource(tuple(stored), self.settings.kvstore_address, self.settings.kv_node_id)
        n = len(job.prompt)
        result = PrefillResult(
            first_token, kv, n, num_cached_tokens, n - num_cached_tokens, self.worker_id,
            job.trace_context,
        )  # fmt: skip
        if job.state is PrefillState.HANDING_OFF:
            if job.handoff_span is not None:
                job.handoff_span.set_attributes(
                    {
                        Attr.KV_BLOCKS: len(stored),
                        Attr.KV_BYTES: len(stored) * self.engine.block_bytes,
                    }
                )
            job.settle(PrefillState.DONE, result)

    # ---- telemetry (engine thread) ----

    def _trace_step(self, plan: SchedulerPlan) -> None:
        """Open the step's batch span, and the queue and compute spans of newly scheduled jobs."""
        jobs = [j for c in plan.chunks if (j := self._jobs.get(c.seq.request_id)) is not None]
        start_ns = self._step_started_ns
        for job in jobs:
            if job.compute_span is None and job.state is PrefillState.COMPUTING:
                self._start_compute(job, start_ns)
        spans = [j.compute_span for j in jobs if j.compute_span is not None]
        if not spans:
            return
        num_tokens = sum(c.num_tokens for c in plan.chunks)
        metrics.BATCH_TOKENS.labels("prefill").observe(num_tokens)
        self._batch_span = tracer.start_span(
            "prefill.batch",
            context=trace.set_span_in_context(spans[0]),
            links=[trace.Link(s.get_span_context()) for s in spans[1:]],
            start_time=start_ns,
            attributes={Attr.BATCH_SIZE: len(plan.chunks), Attr.BATCH_TOKENS: num_tokens},
        )

    def _start_compute(self, job: _Job, start_ns: int) -> None:
        parent = extract_context(job.trace_context)
        wait_s = max(0.0, time.monotonic() - job.admitted_at)
        metrics.QUEUE_WAIT.labels("prefill_waiting").observe(wait_s)
        queued = tracer.start_span(
            "prefill.queue",
            context=parent,
            start_time=job.admitted_ns or start_ns,
            attributes={Attr.QUEUE: "prefill_waiting", Attr.QUEUE_WAIT_S: round(wait_s, 6)},
        )
        queued.end(end_time=max(start_ns, job.admitted_ns))
        job.compute_span = tracer.start_span(
            "prefill.compute",
            context=parent,
            start_time=start_ns,
            attributes={Attr.REQUEST_ID: job.request_id, Attr.PROMPT_TOKENS: len(job.prompt)},
        )

    def _end_compute(self, job: _Job, num_cached_tokens: int) -> None:
        span, job.compute_span = job.compute_span, None
        if span is not None:
            span.set_attributes({
                Attr.CACHED_TOKENS: num_cached_tokens,
                Attr.COMPUTED_TOKENS: len(job.prompt) - num_cached_tokens,
            })  # fmt: skip
            span.end()

    def _end_batch_span(self, error: Exception | None) -> None:
        span, self._batch_span = self._batch_span, None
        if span is not None:
            if error is not None:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, f"prefill step failed: {error}"))
            span.end()

    def _publish_load(self) -> None:
        engine = self.engine
        self.load = PrefillLoad(
            running=engine.num_running,
            waiting=engine.num_waiting
            + sum(j.state is PrefillState.LOADING for j in self._snapshot_jobs()),
            num_free_blocks=engine.num_free_kv_blocks,
            num_prompt_tokens_computed=engine.stats.num_prompt_tokens_computed,
            num_prompt_tokens_cached=self._num_cached,
            step_ms=self._last_step_ms,
            pending_prompt_tokens=self.engine.num_pending_prompt_tokens,
        )
        metrics.QUEUE_DEPTH.labels("prefill_waiting").set(self.load.waiting)
        metrics.RUNNING_BATCH_SIZE.set(self.load.running)
        metrics.KV_CACHE_USAGE.set(1 - engine.num_free_kv_blocks / engine.num_kv_blocks)


def _end_spans(job: _Job, error: Exception | None) -> None:
    """End the job's open spans (any thread; a span ends once)."""
    for name in ("compute_span", "handoff_span"):
        span = getattr(job, name)
        setattr(job, name, None)
        if span is None:
            continue
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()


def _count_prefix_hits(num_own_blocks: int, fetched_tiers, block_size: int) -> None:
    """Prompt tokens loaded instead of computed: own cache (hbm) and kvstore (by tier)."""
    if num_own_blocks:
        metrics.PREFIX_CACHE_HIT_TOKENS.labels("hbm").inc(num_own_blocks * block_size)
    for tier in fetched_tiers:
        if tier is not None:
            metrics.PREFIX_CACHE_HIT_TOKENS.labels(tier.label).inc(block_size)


def _layer_listener(needs: list[tuple[_Job, bytes]]) -> Callable[[LayerGroup], None]:
    """Hand each layer group of a step to the jobs whose blocks it holds, and wake their
    followers (the handoff's writer thread)."""
    wanted: dict[int, tuple[_Job, set[bytes]]] = {}
    for job, key in needs:
        wanted.setdefault(id(job), (job, set()))[1].add(key)

    def on_layers(group: LayerGroup) -> None:
        for job, keys in wanted.values():
            mine = group.subset(keys)
            if mine is not None:
                job.layer_groups.append(mine)
                job.notify()

    return on_layers


def _notify_when_done(job: _Job, futures: list[Future]) -> None:
    """Wake the job's followers when its blocks are sealed (once per step, not per block)."""
    if futures:
        _when_all(futures, job.notify)


def _when_all(futures: list[Future], callback: Callable[[], None]) -> None:
    """Call ``callback`` once every future is done (at once when there are none)."""
    remaining = [len(futures)]
    lock = threading.Lock()
    if not futures:
        callback()
        return

    def one_done(_: Future) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            callback()

    for fut in futures:
        fut.add_done_callback(one_done)
