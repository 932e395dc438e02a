"""The decode worker: continuous batching over the paged KV pool, fed by KV handoffs.

Lifecycle of a request (:class:`DecodeState`)::

    WAITING_FOR_KV (its blocks are being fetched on the fetch pool; the running batch
                    keeps stepping)  → at most kv_fetch_timeout_s, then recompute locally
      → ADMITTED (blocks imported into the prefix cache; queued in the engine with the
                  prefill worker's first token)
      → RUNNING (first chunk sent; one chunk per engine step)
      → FINISHED (stop, length) | ABORTED (client cancelled, worker stopping) | failed

A request without a KV source skips WAITING_FOR_KV: the engine prefills it locally,
chunked under the token budget and interleaved with the running decodes.

Invariants:
- One thread (``engine-decode``) drives the engine; the gRPC side and the fetch pool hand
  it closures through ``_inbox.call_soon``. Sinks are called on that thread and must not block.
- Every path out releases the request: FINISHED/failed by the engine itself, ABORTED by
  ``LLMEngine.abort`` (blocks freed at once); a late fetch result for a request that is no
  longer WAITING_FOR_KV is dropped.
- A fetch never blocks the batch: imported blocks enter the prefix cache on the engine
  thread between two steps, in one call, just before the request is queued.

Telemetry (spans under ``DecodeSpec.trace_context``, the RPC's request span; the engine and
fetch threads carry it in the job): ``decode.admission`` (WAITING_FOR_KV → ADMITTED, with
the fallback reason if any), ``kv.fetch`` (fetch pool; linked to the prefill span named in
``DecodeSpec.prefill_trace``; bytes, blocks, tier, transport, node), ``decode.loop``
(ADMITTED → FINISHED: the ``gen_ai.first_token`` event, token count and ITL statistics,
finish reason, ERROR status on failure). Every span is ended on every path.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from pdserve import metrics
from pdserve.engine.kv_connector import KVLoad
from pdserve.engine.llm_engine import RequestOutput
from pdserve.engine.sampler import SampledToken
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv.compression import KVGeometry
from pdserve.kv.metadata import RedisLayout, WorkerRegistry, connect_for
from pdserve.model.loader import Checkpoint
from pdserve.telemetry import (
    Attr,
    Event,
    extract_context,
    get_tracer,
    inject_context,
    itl_attributes,
    links_from,
)
from pdserve.tls import ClusterSecurity
from pdserve.wire import KVSource
from services.decode.fetch import KVFetcher
from services.decode.follow import HandoffProgress, HandoffStream, PrefillFollower
from services.decode.hbm import HbmPublisher
from services.decode.layers import LayerPull, StagedReads
from services.decode.settings import DecodeSettings
from services.engine_worker import EngineWorker, OverloadedError, Registry  # noqa: F401 - re-exported for the server

log = structlog.get_logger(__name__)
tracer = get_tracer(__name__)


class DecodeState(enum.Enum):
    WAITING_FOR_KV = "waiting_for_kv"
    ADMITTED = "admitted"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """A validated request (wire values already converted)."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    cache_salt: str | None = None
    first_token: SampledToken | None = None  # sampled by a prefill worker
    resume_token_ids: tuple[int, ...] = ()  # a migrated request: output already streamed
    kv: KVSource | None = None
    kv_fetch_timeout_s: float | None = None  # None: the worker's default
    trace_context: dict[str, str] = dataclasses.field(default_factory=dict)  # parent of spans
    prefill_trace: dict[str, str] = dataclasses.field(default_factory=dict)  # linked by kv.fetch
    prefill_address: str | None = None  # overlapped handoff: follow this prefill worker


@dataclasses.dataclass(frozen=True)
class DecodeEvent:
    """One chunk of the stream; the last one has finish_reason (and usage) or error."""

    token_ids: list[int]
    text: str = ""
    logprobs: list[SampledToken] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    num_cached_tokens: int = 0
    num_kv_blocks_fetched: int = 0  # first chunk only
    recomputed: bool = False  # first chunk only
    error: str | None = None

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


Sink = Callable[[DecodeEvent], None]


@dataclasses.dataclass(eq=False)
class _Job:
    spec: DecodeSpec
    sink: Sink
    state: DecodeState = DecodeState.WAITING_FOR_KV
    load: KVLoad | None = None  # engine blocks reserved for the fetched prompt blocks
    first_token: SampledToken | None = None  # from the spec, or from the followed prefill
    follow: HandoffStream | None = None  # the Prefill.Handoff being followed
    pull: LayerPull | None = None  # which reserved blocks of a followed handoff are loaded
    staged: StagedReads | None = None  # how the pull reads the kvstore (pins, calls)
    # Overlapped handoff: the prefill's request span (kv.fetch links to it) and the prompt
    # tokens it loaded instead of computing (the usage's cached_tokens), from Prefill.Handoff.
    prefill_trace: dict[str, str] = dataclasses.field(default_factory=dict)
    prefill_cached_tokens: int | None = None
    kv_deadline: float = 0.0
    num_fetched: int = 0
    recomputed: bool = False
    num_completion_tokens: int = 0
    sent_first: bool = False
    last_token_at: float = 0.0
    admitted_at: float = 0.0  # time.perf_counter()
    token_times: list[float] = dataclasses.field(default_factory=list)  # perf_counter per token
    admission_span: trace.Span | None = None
    loop_span: trace.Span | None = None

    def parent(self):
        return extract_context(self.spec.trace_context)


@dataclasses.dataclass(frozen=True)
class DecodeLoad:
    """Published by the engine thread after every iteration (read by Stats and heartbeat).

    ``num_free_blocks`` counts blocks no running sequence holds, cached ones included (they
    are evicted on demand)."""

    running: int = 0
    waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_cached_blocks: int = 0
    num_prompt_tokens_computed: int = 0
    num_generation_tokens: int = 0
    num_kv_blocks_fetched: int = 0
    num_recomputed: int = 0
    step_ms: float = 0.0  # the last engine step's wall time (the console shows it)
    pending_prompt_tokens: int = 0  # prompt tokens queued or mid-prefill here


class DecodeWorker(EngineWorker):
    role = "decode"

    def __init__(
        self,
        settings: DecodeSettings,
        *,
        checkpoint: Checkpoint | None = None,
        worker_id: str,
        address: str,
        fetcher: KVFetcher | None = None,
        follower: PrefillFollower | None = None,
        registry: Registry | None = None,
    ) -> None:
        """``fetcher``, ``follower`` and ``registry`` default to the network and the Redis
        registry the settings name; pass others (an in-process store, an in-memory registry) to
        run without them. With a registry passed in, the HBM inventory is not published."""
        self._num_fetched = 0
        self._num_recomputed = 0
        self._phase = "decode"
        self._hbm = None
        if registry is None:
            registry = self._connect_redis(settings, worker_id)
        super().__init__(
            settings, checkpoint=checkpoint, worker_id=worker_id, address=address,
            registry=registry,
        )  # fmt: skip
        security = ClusterSecurity.from_settings(settings)
        self.follower = follower or PrefillFollower(self.engine.model_config.vocab_size, security)
        self.fetcher = fetcher or KVFetcher(
            settings.node_id,
            allow_shm=settings.kv_transport == "auto",
            timeout_s=settings.kv_timeout_s,
            security=security,
            int8_geometry=self.kv_geometry() if settings.kv_compression == "int8" else None,
        )
        self._fetch_pool = ThreadPoolExecutor(
            settings.kv_fetch_threads, thread_name_prefix="decode-fetch"
        )

    def kv_geometry(self) -> KVGeometry:
        """The layout of this engine's KV blocks (what an encoded fetch decodes into)."""
        m = self.engine.model_config
        dtype = str(self.engine.dtype).removeprefix("torch.")
        geometry = KVGeometry(m.num_layers, self.block_size, m.num_kv_heads, m.head_dim, dtype)
        assert geometry.block_nbytes == self.engine.block_bytes  # one layout, stated twice
        return geometry

    def _connect_redis(self, settings: DecodeSettings, worker_id: str) -> WorkerRegistry:
        """The registry and, when enabled, the HBM inventory publisher, both in Redis."""
        redis = connect_for(settings)
        layout = RedisLayout(settings.cluster_name)
        if settings.hbm_publish_interval_s > 0:
            self._hbm = HbmPublisher(redis, layout, worker_id, settings.hbm_publish_interval_s)
        return WorkerRegistry(redis, layout, settings.heartbeat_ttl_s)

    # ---- lifecycle ----

    def start(self) -> None:
        if self._hbm is not None:
            self._hbm.start()
        super().start()

    def _close(self) -> None:
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        if self._hbm is not None:
            self._hbm.stop()
        self.fetcher.close()
        self.follower.close()

    def _capacity(self) -> dict[str, int]:
        return {
            "num_blocks": self.load.num_total_blocks,
            "max_num_seqs": self.settings.engine.max_num_seqs,
        }

    def _load_fields(self) -> dict[str, float]:
        return {**super()._load_fields(), "num_cached_blocks": self.load.num_cached_blocks}

    # ---- the API (any thread) ----

    def submit(self, spec: DecodeSpec, sink: Sink) -> None:
        """Queue a request; its chunks go to ``sink`` (on the engine thread).

        Raises ValueError for bad input and OverloadedError when the worker is full."""
        if not spec.request_id:
            raise ValueError("request_id must not be empty")
        prompt = self.engine.encode_prompt(spec.prompt)
        self.engine.validate_prompt(prompt, spec.params)
        vocab = self.engine.model_config.vocab_size
        if spec.first_token is not None and not 0 <= spec.first_token.token_id < vocab:
            raise ValueError(f"first_token_id must be in [0, {vocab})")
        if spec.kv_fetch_timeout_s is not None and spec.kv_fetch_timeout_s < 0:
            raise ValueError("kv_fetch_timeout_s must be >= 0")
        job = _Job(dataclasses.replace(spec, prompt=prompt), sink)
        self._register(spec.request_id, job)
        self._inbox.call_soon(lambda: self._start(job))

    def cancel(self, request_id: str) -> None:
        """Abort at any state; engine blocks are freed before the next step."""
        self._inbox.call_soon(lambda: self._abort(request_id))

    # ---- WAITING_FOR_KV (engine thread, then the fetch pool) ----

    def _start(self, job: _Job) -> None:
        spec = job.spec
        job.first_token = spec.first_token
        job.admission_span = tracer.start_span(
            "decode.admission",
            context=job.parent(),
            attributes={Attr.REQUEST_ID: spec.request_id, Attr.QUEUE: "decode_kv_fetching"},
        )
        if spec.prefill_address:
            self._start_follow(job)
            return
        if spec.kv is None or not spec.kv.block_keys:
            self._admit(job, 0)
            return
        bs, n = self.block_size, len(spec.prompt)
        usable = n // bs if spec.first_token is not None else (n - 1) // bs
        offered = min(len(spec.kv.block_keys), usable)
        keys = self.engine.block_keys(spec.prompt[: offered * bs], spec.cache_salt)
        if list(spec.kv.block_keys[:offered]) != keys:
            _log(job, "decode.kv_keys_mismatch")
            _fallback(job, "mismatch")
            job.recomputed = True  # another model, block size or salt: never import those
            self._admit(job, 0)
            return
        job.load = self.engine.start_load(spec.request_id, spec.prompt, offered, spec.cache_salt)
        if job.load.num_to_load == 0:
            self._admit(job, 0)
            return
        timeout_s = spec.kv_fetch_timeout_s or self.settings.kv_fetch_timeout_s
        job.kv_deadline = time.monotonic() + timeout_s
        self._fetch_pool.submit(self._fetch, job, spec.kv)

    def _start_follow(self, job: _Job) -> None:
        """Overlapped handoff: reserve blocks for every full prompt block now, then follow the
        prefill (fetch pool), pulling each layer group as it is written (same host) and any
        block still missing once it is sealed."""
        spec, engine = job.spec, self.engine
        num_full = len(spec.prompt) // self.block_size
        job.load = engine.start_load(spec.request_id, spec.prompt, num_full, spec.cache_salt)
        num_layers = engine.model_config.num_layers
        job.pull = LayerPull(job.load.keys_to_load, num_layers, engine.layer_nbytes)
        self._fetch_pool.submit(self._follow, job)

    def _follow(self, job: _Job) -> None:
        spec, s = job.spec, self.settings
        first, error = None, None
        with structlog.contextvars.bound_contextvars(request_id=spec.request_id):
            try:
                job.follow = self.follower.follow(
                    spec.prefill_address, spec.request_id, wait_s=s.handoff_wait_s,
                    timeout_s=s.handoff_timeout_s,
                )  # fmt: skip
                for progress in job.follow:
                    if job.state is not DecodeState.WAITING_FOR_KV:
                        job.follow.cancel()
                        return
                    job.prefill_trace = progress.trace or job.prefill_trace
                    self._pull_layers(job, progress)
                    self._pull(job, progress.kv)
                    first = progress.first_token or first
                    job.prefill_cached_tokens = progress.num_cached_tokens
            except Exception as exc:  # noqa: BLE001 - any failure: recompute locally
                error = str(exc)
            finally:
                if job.staged is not None:
                    job.staged.close()  # every pin given back, however the follow ended
        num_loaded = job.pull.num_ready_prefix
        self._inbox.call_soon(lambda: self._on_followed(job, first, num_loaded, error))

    def _pull_layers(self, job: _Job, progress: HandoffProgress) -> None:
        """Copy the announced layer groups out of the prefill's staging slots into the
        reservation, read as the kvstore's transport allows (its segment, pinned, on the same
        host; GetStaged from another); a group that cannot be read is left to the sealed path."""
        if not progress.layers:
            return
        if job.staged is None:
            start_span = functools.partial(self._staged_span, job, progress.kv)
            job.staged = self.fetcher.staged_reads(progress.kv, start_span)
            if job.staged is None:
                return
        load, pull = job.load, job.pull
        try:
            for group in progress.layers:
                pull.add(group, job.staged, lambda *a: self.engine.load_layers(load, *a))
        except Exception as exc:  # noqa: BLE001 - those blocks are fetched whole or recomputed
            _log(job, "decode.layer_pull_failed", error=str(exc))

    def _staged_span(self, job: _Job, source: KVSource, transport: str) -> trace.Span:
        """One ``kv.fetch`` of a layer pull's lease (the StagedReads ends it)."""
        return tracer.start_span(
            "kv.fetch",
            context=job.parent(),
            links=links_from(job.prefill_trace or job.spec.prefill_trace),
            attributes={
                Attr.REQUEST_ID: job.spec.request_id, Attr.KV_DIRECTION: "get",
                Attr.KV_NODE: source.node_id, Attr.KV_TRANSPORT: transport,
                Attr.KV_TIER: "staging",
            },
        )  # fmt: skip

    def _pull(self, job: _Job, source: KVSource) -> None:
        """Fetch whole every sealed block that the layer pulls did not complete."""
        load, pull = job.load, job.pull
        num_sealed = min(len(source.block_keys) - load.first, load.num_to_load)
        sealed = tuple(source.block_keys[load.first : load.first + num_sealed])
        if num_sealed <= 0 or sealed != load.keys_to_load[:num_sealed]:
            return  # nothing sealed, or another model or salt: never load those
        for start, stop in pull.missing_runs(num_sealed):
            got = self._fetch_into(job, source, load.keys_to_load[start:stop], start)
            pull.mark_ready(start, len(got))
            if len(got) < stop - start:
                return  # a miss: later events retry it

    def _on_followed(self, job: _Job, first: SampledToken | None, num_loaded: int, error) -> None:
        if job.state is not DecodeState.WAITING_FOR_KV:
            return  # cancelled meanwhile
        if first is None:  # the prefill failed or was cancelled: recompute what is missing
            _log(job, "decode.handoff_failed", error=error)
            _fallback(job, "error")
            job.recomputed = True
        job.first_token = first
        self._admit(job, num_loaded)

    def _fetch(self, job: _Job, source: KVSource) -> None:
        payloads = self._fetch_into(job, source, job.load.keys_to_load, 0)
        self._inbox.call_soon(lambda: self._on_fetched(job, len(payloads)))

    def _fetch_into(self, job: _Job, source: KVSource, keys: Sequence[bytes], start: int) -> list:
        """Fetch ``keys`` and write them into the job's reserved blocks from ``start`` on
        (this thread: the engine keeps stepping). Returns the verified prefix written."""
        attributes = {
            Attr.REQUEST_ID: job.spec.request_id, Attr.KV_DIRECTION: "get",
            Attr.KV_NODE: source.node_id,
        }  # fmt: skip
        with (
            tracer.start_as_current_span(
                "kv.fetch",
                context=job.parent(),
                links=links_from(job.prefill_trace or job.spec.prefill_trace),
                attributes=attributes,
            ) as span,
            structlog.contextvars.bound_contextvars(request_id=job.spec.request_id),
        ):
            result = self.fetcher.fetch(source, keys, trace_context=inject_context())
            payloads = result.payloads
            try:
                self.engine.load_blocks(job.load, start, payloads)
            except ValueError:  # released meanwhile (cancelled, timed out)
                payloads = []
            span.set_attributes({
                Attr.KV_BYTES: result.num_bytes, Attr.KV_BLOCKS: len(payloads),
                Attr.KV_TIER: result.tier or "none", Attr.KV_TRANSPORT: result.transport or "none",
            })  # fmt: skip
            if result.error is not None:
                span.set_status(Status(StatusCode.ERROR, f"kv fetch failed: {result.error}"))
        _observe_fetch(result)
        return payloads

    def _on_fetched(self, job: _Job, num_loaded: int) -> None:
        if job.state is not DecodeState.WAITING_FOR_KV:
            return  # timed out (already recomputing) or cancelled
        if num_loaded < job.load.num_to_load:
            _fallback(job, "miss")
        _log(job, "decode.kv_fetched", "debug", blocks=num_loaded)
        self._admit(job, num_loaded)

    def _expire(self) -> None:
        now = time.monotonic()
        for job in self._snapshot_jobs():
            if (
                job.state is DecodeState.WAITING_FOR_KV
                and job.kv_deadline
                and now > job.kv_deadline
            ):
                _log(job, "decode.kv_fetch_timeout")
                _fallback(job, "timeout")
                self._admit(job, 0)

    # ---- ADMITTED → RUNNING → FINISHED (engine thread) ----

    def _admit(self, job: _Job, num_loaded: int) -> None:
        """Commit the loaded blocks (the rest of the reservation is freed) and queue."""
        spec, bs, load = job.spec, self.block_size, job.load
        metrics.PREFIX_CACHE_QUERY_TOKENS.inc(len(spec.prompt))
        if load is not None and load.first:
            metrics.PREFIX_CACHE_HIT_TOKENS.labels("hbm").inc(load.first * bs)
        job.num_fetched = num_loaded
        self._num_fetched += num_loaded
        if load is not None and num_loaded < load.num_to_load:
            job.recomputed = True
        self._num_recomputed += job.recomputed
        try:
            self.engine.add_request(
                spec.prompt,
                spec.params,
                request_id=spec.request_id,
                cache_salt=spec.cache_salt,
                first_token=job.first_token,
                resume_token_ids=spec.resume_token_ids,
                kv_load=load,
                num_loaded_blocks=num_loaded,
            )
        except ValueError as exc:
            if load is not None:
                self.engine.release_load(load)
            self._end(job, DecodeEvent([], error=str(exc)))
            return
        job.state = DecodeState.ADMITTED
        self._trace_admitted(job)
        first = self.engine.emit_first_token(spec.request_id)
        if first is not None:  # the prefill's token reaches the client before our first step
            self._on_outputs([first])

    def _abort(self, request_id: str) -> None:
        with self._lock:
            job = self._jobs.get(request_id)
        if job is None:
            return
        if job.state in (DecodeState.ADMITTED, DecodeState.RUNNING):
            self.engine.abort(request_id)
        elif job.load is not None:
            self.engine.release_load(job.load)
            if job.follow is not None:
                job.follow.cancel()
        job.state = DecodeState.ABORTED
        self._end(job, DecodeEvent([], finish_reason="abort"))

    def _end(self, job: _Job, event: DecodeEvent) -> None:
        with self._lock:
            self._jobs.pop(job.spec.request_id, None)
        if job.state is not DecodeState.ABORTED:
            job.state = DecodeState.FINISHED
        _end_spans(job, event)
        self._send(job, event)

    def _send(self, job: _Job, event: DecodeEvent) -> None:
        if not job.sent_first:
            job.sent_first = True
            event = dataclasses.replace(
                event, num_kv_blocks_fetched=job.num_fetched, recomputed=job.recomputed
            )
        try:
            job.sink(event)
        except Exception:  # noqa: BLE001 - a gone consumer must not stop the batch
            _log(job, "decode.sink_failed")

    def _after_iteration(self) -> None:
        if self._hbm is not None and self._hbm.due():
            self._hbm.sync(self.engine.cached_keys())

    def _shut_down_jobs(self) -> None:
        for job in self._snapshot_jobs():
            self._abort(job.spec.request_id)

    def _idle_wait_s(self) -> float:
        deadlines = [j.kv_deadline for j in self._snapshot_jobs() if j.kv_deadline]
        return max(0.0, min([0.05, *(d - time.monotonic() for d in deadlines)]))

    def _step_phase(self) -> str:
        return self._phase

    def _step_failed(self, error: Exception) -> None:
        for job in self._snapshot_jobs():
            if job.state in (DecodeState.ADMITTED, DecodeState.RUNNING):
                self.engine.abort(job.spec.request_id)
                self._end(job, DecodeEvent([], error=f"decode step failed: {error}"))

    def _on_outputs(self, outputs: Sequence[RequestOutput]) -> None:
        by_request: dict[str, list[RequestOutput]] = {}
        for out in outputs:
            by_request.setdefault(out.request_id, []).append(out)
        for request_id, outs in by_request.items():
            with self._lock:
                job = self._jobs.get(request_id)
            if job is not None:
                self._deliver(job, outs)

    def _cached_tokens(self, job: _Job, out: RequestOutput) -> int:
        """Prompt tokens loaded from a cache instead of computed anywhere. After an overlapped
        handoff: the prefill's own count (the blocks it sent were computed, not cached);
        otherwise this engine's (for a sequential handoff the router, which holds the
        PrefillResponse, puts the prefill's count in the client's usage)."""
        if job.prefill_cached_tokens is not None and not job.recomputed:
            return job.prefill_cached_tokens
        return out.num_cached_tokens

    def _deliver(self, job: _Job, outs: list[RequestOutput]) -> None:
        """One chunk for this step's outputs of one request (a prefilled first token comes
        alone, at admission: ``_admit``)."""
        last = outs[-1]
        tokens = [t for o in outs for t in o.new_token_ids]
        now = time.perf_counter()
        if job.last_token_at and tokens:
            for _ in tokens:
                metrics.INTER_TOKEN_LATENCY.observe((now - job.last_token_at) / len(tokens))
        if tokens:
            self._trace_tokens(job, len(tokens), now)
        job.last_token_at = now
        job.num_completion_tokens += len(tokens)
        job.state = DecodeState.RUNNING
        event = DecodeEvent(
            token_ids=tokens,
            text="".join(o.text_delta for o in outs),
            logprobs=[lp for o in outs for lp in o.new_logprobs],
            finish_reason=last.finish_reason if last.finished else None,
            num_prompt_tokens=last.num_prompt_tokens,
            num_completion_tokens=job.num_completion_tokens,
            num_cached_tokens=self._cached_tokens(job, last),
        )
        if last.finish_reason == "error":
            self._end(
                job,
                dataclasses.replace(
                    event, finish_reason=None, error="the request cannot fit this worker's KV cache"
                ),
            )
        elif last.finished:
            self._end(job, event)
        else:
            self._send(job, event)

    # ---- telemetry (engine thread) ----

    def _on_layer_done(self, layer: int, plan) -> None:
        if layer == 0:
            prefilling = any(c.start < c.seq.num_prompt_tokens for c in plan.chunks)
            self._phase = "mixed" if prefilling else "decode"
            num_tokens = sum(c.num_tokens for c in plan.chunks)
            metrics.BATCH_TOKENS.labels(self._phase).observe(num_tokens)

    def _trace_admitted(self, job: _Job) -> None:
        """ADMITTED: close the admission span, open the decode loop's."""
        job.admitted_at = time.perf_counter()
        span, job.admission_span = job.admission_span, None
        if span is not None:
            if job.kv_deadline:  # it waited for a KV fetch
                wait_s = time.monotonic() - (job.kv_deadline - self._fetch_timeout_s(job))
                metrics.QUEUE_WAIT.labels("decode_kv_fetching").observe(max(0.0, wait_s))
            span.set_attributes({
                Attr.KV_BLOCKS: job.num_fetched, "pdserve.decode.recomputed": job.recomputed,
                Attr.CACHED_TOKENS: (job.load.first if job.load else 0) * self.block_size,
            })  # fmt: skip
            span.end()
        spec = job.spec
        job.loop_span = tracer.start_span(
            "decode.loop",
            context=job.parent(),
            attributes={
                Attr.REQUEST_ID: spec.request_id, Attr.INPUT_TOKENS: len(spec.prompt),
                Attr.MAX_TOKENS: spec.params.max_tokens,
            },
        )  # fmt: skip

    def _fetch_timeout_s(self, job: _Job) -> float:
        return job.spec.kv_fetch_timeout_s or self.settings.kv_fetch_timeout_s

    def _trace_tokens(self, job: _Job, num_tokens: int, now: float) -> None:
        """Token times for the ITL summary; tokens of one step are spread over its duration."""
        if not job.token_times and job.loop_span is not None:
            job.loop_span.add_event(Event.FIRST_TOKEN)
            metrics.QUEUE_WAIT.labels("decode_waiting").observe(now - job.admitted_at)
        since = job.last_token_at or job.admitted_at or now
        job.token_times.extend(
            since + (now - since) * (i + 1) / num_tokens for i in range(num_tokens)
        )

    def _publish_load(self) -> None:
        engine, stats = self.engine, self.engine.stats
        fetching = sum(j.state is DecodeState.WAITING_FOR_KV for j in self._snapshot_jobs())
        self.load = DecodeLoad(
            running=engine.num_running,
            waiting=engine.num_waiting + fetching,
            num_free_blocks=engine.num_free_kv_blocks,
            num_total_blocks=engine.num_kv_blocks,
            num_cached_blocks=engine.num_cached_kv_blocks,
            num_prompt_tokens_computed=stats.num_prompt_tokens_computed,
            num_generation_tokens=stats.num_generation_tokens,
            num_kv_blocks_fetched=self._num_fetched,
            num_recomputed=self._num_recomputed,
            step_ms=self._last_step_ms,
            pending_prompt_tokens=self.engine.num_pending_prompt_tokens,
        )
        metrics.QUEUE_DEPTH.labels("decode_waiting").set(engine.num_waiting)
        metrics.QUEUE_DEPTH.labels("decode_kv_fetching").set(fetching)
        metrics.RUNNING_BATCH_SIZE.set(engine.num_running)
        metrics.KV_CACHE_USAGE.set(1 - engine.num_free_kv_blocks / engine.num_kv_blocks)


def _observe_fetch(result) -> None:
    if not result.transport:
        return
    labels = ("get", result.transport, result.tier or "none")
    metrics.KV_TRANSFER_BLOCKS.labels(*labels).inc(len(result.payloads))
    metrics.KV_TRANSFER_BYTES.labels(*labels).inc(result.num_bytes)
    metrics.KV_TRANSFER_DURATION.labels(*labels).observe(result.seconds)


def _log(job: _Job, event: str, level: str = "warning", **fields) -> None:
    """A log line of one request from the engine thread: its request id, trace and span ids."""
    span = job.admission_span or job.loop_span
    context = trace.set_span_in_context(span) if span is not None else job.parent()
    token = otel_context.attach(context)
    try:
        getattr(log, level)(event, request_id=job.spec.request_id, **fields)
    finally:
        otel_context.detach(token)


def _fallback(job: _Job, reason: str) -> None:
    """The KV fetch was abandoned for a local recompute: count it and say so on the span."""
    metrics.KV_FETCH_FALLBACKS.labels(reason).inc()
    if job.admission_span is not None:
        job.admission_span.set_attribute(Attr.KV_FALLBACK, reason)
        job.admission_span.add_event(Event.KV_FALLBACK, {Attr.KV_FALLBACK: reason})


def _end_spans(job: _Job, event: DecodeEvent) -> None:
    """FINISHED or ABORTED: the decode loop's summary, the finish reason, errors as status."""
    reason = event.finish_reason or ("error" if event.error else "abort")
    for span in (job.admission_span, job.loop_span):
        if span is None:
            continue
        if span is job.loop_span:
            span.set_attributes(itl_attributes(job.token_times))
            span.set_attribute(Attr.OUTPUT_TOKENS, job.num_completion_tokens)
        span.set_attribute(Attr.FINISH_REASONS, [reason])
        span.add_event(Event.FINISH, {"reason": reason})
        if event.error is not None:
            span.set_status(Status(StatusCode.ERROR, event.error))
        span.end()
    job.admission_span = job.loop_span = None
