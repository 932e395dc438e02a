"""Tracing and logging set-up shared by every pdserve process.

One call per process, at start-up, before any span is opened::

    telemetry = setup_from_settings(settings, "prefill")   # or setup_telemetry(...)

- Traces: an OpenTelemetry SDK tracer provider with this service's resource (``service.name``
  ``pdserve-<role>``, node, worker id, model), a ``ParentBased(TraceIdRatioBased(ratio))``
  sampler and a batch span processor. Spans go to an OTLP gRPC collector when an endpoint is
  configured (``OTEL_EXPORTER_OTLP_ENDPOINT``), otherwise to a local JSON-lines span file
  (``pdserve/span_file.py``) that ``pdserve trace`` renders.
- Logs: structlog, JSON lines on stderr (console renderer when stderr is a terminal), with
  ``timestamp level service event`` plus ``trace_id span_id`` from the current span and
  whatever is bound with ``structlog.contextvars`` (``request_id``). Prompt and completion
  text is redacted unless ``log_prompts`` is set. Standard-library log records (grpc,
  opentelemetry, redis) are rendered the same way.
- Context propagation across processes: W3C ``traceparent`` in gRPC metadata
  (``pdserve/grpc_tracing.py``), and inside messages with :func:`inject_context` /
  :func:`extract_context` / :func:`links_from` (the protos' ``TraceContext`` fields).

Telemetry never fails a request: exporter errors and unwritable span files are logged once
and the spans dropped. A second set-up in one process (tests) replaces the first: the global
tracer provider is a switch that forwards to the provider of the latest set-up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import structlog.tracebacks
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from pdserve.span_file import SpanFileExporter, default_trace_dir

__all__ = [
    "Attr",
    "Telemetry",
    "configure_logging",
    "current_trace_id",
    "extract_context",
    "get_tracer",
    "inject_context",
    "itl_attributes",
    "links_from",
    "request_span",
    "setup_from_settings",
    "setup_telemetry",
]

_log = logging.getLogger("pdserve.telemetry")


class Attr:
    """Span attribute names. OpenTelemetry GenAI / RPC conventions where one exists."""

    # GenAI semantic conventions.
    OPERATION = "gen_ai.operation.name"  # "chat" | "text_completion"
    SYSTEM = "gen_ai.system"  # "pdserve"
    MODEL = "gen_ai.request.model"
    MAX_TOKENS = "gen_ai.request.max_tokens"
    TEMPERATURE = "gen_ai.request.temperature"
    TOP_P = "gen_ai.request.top_p"
    SEED = "gen_ai.request.seed"
    INPUT_TOKENS = "gen_ai.usage.input_tokens"
    OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
    FINISH_REASONS = "gen_ai.response.finish_reasons"
    RESPONSE_ID = "gen_ai.response.id"
    # pdserve.
    REQUEST_ID = "pdserve.request.id"  # what `pdserve trace REQUEST_ID` looks up
    NODE = "pdserve.node.id"
    WORKER = "pdserve.worker.id"
    ROLE = "pdserve.role"
    ROUTE = "pdserve.route.decision"  # "disaggregated" | "local"
    ROUTE_REASON = "pdserve.route.reason"
    ROUTE_PREFILL_WORKER = "pdserve.route.prefill_worker"
    ROUTE_DECODE_WORKER = "pdserve.route.decode_worker"
    ROUTE_SCORES = "pdserve.route.scores"  # JSON object: worker id -> score
    QUEUE = "pdserve.queue.name"
    QUEUE_WAIT_S = "pdserve.queue.wait_s"
    BATCH_SIZE = "pdserve.batch.num_requests"
    BATCH_TOKENS = "pdserve.batch.num_tokens"
    PROMPT_TOKENS = "pdserve.prefill.num_prompt_tokens"
    CACHED_TOKENS = "pdserve.prefill.num_cached_tokens"
    COMPUTED_TOKENS = "pdserve.prefill.num_computed_tokens"
    KV_BYTES = "pdserve.kv.bytes"
    KV_BLOCKS = "pdserve.kv.num_blocks"
    KV_TIER = "pdserve.kv.tier"  # "hbm" | "dram" | "ssd"
    KV_TRANSPORT = "pdserve.kv.transport"  # "grpc" | "shm" | "local"
    KV_NODE = "pdserve.kv.node"
    KV_DIRECTION = "pdserve.kv.direction"  # "put" | "get"
    KV_FALLBACK = "pdserve.kv.fallback"  # why a fetch was abandoned for local recompute
    DECODE_TOKENS = "pdserve.decode.num_tokens"
    ITL_MEAN_MS = "pdserve.decode.itl_mean_ms"
    ITL_P50_MS = "pdserve.decode.itl_p50_ms"
    ITL_P99_MS = "pdserve.decode.itl_p99_ms"
    ITL_MAX_MS = "pdserve.decode.itl_max_ms"
    # RPC conventions (set by the gRPC interceptors).
    RPC_SYSTEM = "rpc.system"
    RPC_SERVICE = "rpc.service"
    RPC_METHOD = "rpc.method"
    RPC_STATUS = "rpc.grpc.status_code"


class Event:
    """Span event names."""

    FIRST_TOKEN = "gen_ai.first_token"
    FINISH = "pdserve.finish"
    KV_FALLBACK = "pdserve.kv.fallback"


# --- the switchable global tracer provider -------------------------------------------------


class _SwitchTracer(trace.Tracer):
    """Forwards to a tracer of the switch's current provider (cached per provider)."""

    def __init__(self, switch: _SwitchTracerProvider, args: tuple, kwargs: dict) -> None:
        self._switch, self._args, self._kwargs = switch, args, kwargs
        self._cached: tuple[trace.TracerProvider, trace.Tracer] | None = None

    def _target(self) -> trace.Tracer:
        provider = self._switch.delegate
        cached = self._cached
        if cached is None or cached[0] is not provider:
            cached = (provider, provider.get_tracer(*self._args, **self._kwargs))
            self._cached = cached
        return cached[1]

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._target().start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        return self._target().start_as_current_span(*args, **kwargs)


class _SwitchTracerProvider(trace.TracerProvider):
    def __init__(self) -> None:
        self.delegate: trace.TracerProvider = trace.NoOpTracerProvider()

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _SwitchTracer(self, args, kwargs)


_SWITCH = _SwitchTracerProvider()
_install_lock = threading.Lock()


def _install_switch() -> None:
    with _install_lock:
        if trace.get_tracer_provider() is not _SWITCH:
            trace.set_tracer_provider(_SWITCH)
        if trace.get_tracer_provider() is not _SWITCH:
            _log.warning("a tracer provider was set before pdserve's; pdserve spans may be lost")


def get_tracer(name: str) -> trace.Tracer:
    """A tracer that follows the current set-up (safe to create at import time)."""
    return trace.get_tracer(name)


# --- exporters -----------------------------------------------------------------------------


class _LogOnceExporter(SpanExporter):
    """Wraps an exporter: a failure is logged once per outage, never raised."""

    def __init__(self, inner: SpanExporter, target: str) -> None:
        self._inner, self._target, self._failing = inner, target, False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception as exc:  # an exporter bug must not kill the export thread
            result = SpanExportResult.FAILURE
            detail = repr(exc)
        else:
            detail = "export failed"
        if result is SpanExportResult.FAILURE:
            if not self._failing:
                _log.warning("trace export to %s failing, dropping spans: %s", self._target, detail)
            self._failing = True
        elif self._failing:
            _log.info("trace export to %s recovered", self._target)
            self._failing = False
        return result

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):  # best effort
            self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)


def _otlp_exporter(endpoint: str) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    # The exporter logs every retry at WARNING and every failure at ERROR; _LogOnceExporter
    # says it once instead.
    logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").setLevel(logging.CRITICAL)
    insecure = not endpoint.startswith("https://")
    return _LogOnceExporter(
        OTLPSpanExporter(endpoint=endpoint, insecure=insecure, timeout=5), endpoint
    )


# --- set-up --------------------------------------------------------------------------------


@dataclass
class Telemetry:
    """What :func:`setup_telemetry` built. ``span_file`` is None when exporting over OTLP."""

    service_name: str
    provider: TracerProvider
    resource: Resource
    span_file: Path | None
    otlp_endpoint: str | None
    log_prompts: bool

    def tracer(self, name: str) -> trace.Tracer:
        return get_tracer(name)

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Flush and stop exporting; spans opened afterwards are dropped."""
        if _SWITCH.delegate is self.provider:
            _SWITCH.delegate = trace.NoOpTracerProvider()
        self.provider.shutdown()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pdserve")
    except PackageNotFoundError:
        return "0+unknown"


def service_name_for(role: str) -> str:
    return role if role.startswith("pdserve-") else f"pdserve-{role}"


def _resource(service_name: str, role: str, **attrs: str | None) -> Resource:
    base = {
        "service.name": service_name,
        "service.namespace": attrs.pop("cluster_name", None) or "pdserve",
        "service.version": _version(),
        Attr.ROLE: role.removeprefix("pdserve-"),
    }
    node, worker, model = attrs.get("node_id"), attrs.get("worker_id"), attrs.get("model")
    if node:
        base |= {"host.name": node, Attr.NODE: node}
    if worker:
        base |= {"service.instance.id": worker, Attr.WORKER: worker}
    if model:
        base["pdserve.model"] = model
    return Resource.create(base)


def setup_telemetry(
    role: str,
    *,
    node_id: str | None = None,
    worker_id: str | None = None,
    model: str | None = None,
    cluster_name: str | None = None,
    sampling_ratio: float = 1.0,
    trace_dir: Path | str | None = None,
    otlp_endpoint: str | None = None,
    log_level: str | None = "info",
    log_json: bool | None = None,
    log_prompts: bool = False,
    export_delay_ms: int = 1000,
) -> Telemetry:
    """Install tracing (and, unless ``log_level`` is None, logging) for this process.

    ``otlp_endpoint`` None reads ``OTEL_EXPORTER_OTLP_ENDPOINT``; "" forces the span file.
    ``trace_dir`` None is ``$PDSERVE_TRACE_DIR`` or ``./runs/traces``.
    """
    if not 0.0 <= sampling_ratio <= 1.0:
        raise ValueError(f"sampling_ratio must be in [0, 1] (got {sampling_ratio})")
    service_name = service_name_for(role)
    if log_level is not None:
        configure_logging(log_level, json=log_json, service=service_name, log_prompts=log_prompts)
    if otlp_endpoint is None:
        otlp_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    resource = _resource(
        service_name, role, node_id=node_id, worker_id=worker_id, model=model,
        cluster_name=cluster_name,
    )  # fmt: skip
    provider = TracerProvider(
        resource=resource, sampler=ParentBased(TraceIdRatioBased(sampling_ratio))
    )
    span_file = None
    if otlp_endpoint:
        exporter = _otlp_exporter(otlp_endpoint)
    else:
        file_exporter = SpanFileExporter(Path(trace_dir or default_trace_dir()), service_name)
        exporter, span_file = file_exporter, file_exporter.path
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=export_delay_ms))
    _install_switch()
    previous, _SWITCH.delegate = _SWITCH.delegate, provider
    if isinstance(previous, TracerProvider):
        previous.shutdown()
    _log.debug(
        "telemetry ready: exporter=%s target=%s sampling_ratio=%s",
        "otlp" if otlp_endpoint else "file", otlp_endpoint or span_file, sampling_ratio,
    )  # fmt: skip
    return Telemetry(
        service_name, provider, resource, span_file, otlp_endpoint or None, log_prompts
    )


def setup_from_settings(
    settings: Any, role: str, *, worker_id: str | None = None, model: str | None = None
) -> Telemetry:
    """:func:`setup_telemetry` from a :class:`pdserve.config.ServiceSettings` (any subclass).

    ``worker_id`` defaults to ``<role>-<node>-<grpc_port>`` (the pid when the port is 0).
    """
    if worker_id is None:
        port = getattr(settings, "grpc_port", 0) or os.getpid()
        worker_id = f"{role}-{settings.node_id}-{port}"
    if model is None:
        name = getattr(settings, "model_name", None) or getattr(settings, "model", None)
        model = Path(name).name if name else None
    return setup_telemetry(
        role,
        node_id=settings.node_id,
        worker_id=worker_id,
        model=model,
        cluster_name=settings.cluster_name,
        sampling_ratio=settings.trace_sampling_ratio,
        trace_dir=settings.trace_dir,
        otlp_endpoint=settings.otlp_endpoint or "",
        log_level=settings.log_level,
        log_json=settings.log_json,
        log_prompts=settings.log_prompts,
    )


# --- context carried inside messages -------------------------------------------------------


def inject_context(context: otel_context.Context | None = None) -> dict[str, str]:
    """The current (or given) trace context as W3C entries (``traceparent``, ``tracestate``)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier


def extract_context(entries: Mapping[str, str] | None) -> otel_context.Context:
    """A context whose parent is the span ``entries`` describe (empty entries: a new root)."""
    return propagate.extract(dict(entries or {}))


def links_from(*carriers: Mapping[str, str] | None, **attributes: Any) -> list[trace.Link]:
    """Span links to the spans the carriers describe (invalid or empty ones are skipped)."""
    links = []
    for entries in carriers:
        span_context = trace.get_current_span(extract_context(entries)).get_span_context()
        if span_context.is_valid:
            links.append(trace.Link(span_context, attributes or None))
    return links


def current_trace_id() -> str | None:
    """The current span's trace id as 32 hex digits, None outside a span."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


@contextlib.contextmanager
def request_span(
    name: str,
    request_id: str,
    *,
    context: otel_context.Context | None = None,
    links: Sequence[trace.Link] = (),
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    **attributes: Any,
) -> Iterator[trace.Span]:
    """A span carrying ``pdserve.request.id`` (what ``pdserve trace ID`` finds), with
    ``request_id`` bound into every log line inside it. ``attributes`` use Attr names::

        with request_span("router.request", rid, **{Attr.MAX_TOKENS: 64}) as span: ...
    """
    attrs = {Attr.REQUEST_ID: request_id, **attributes}
    tracer = get_tracer("pdserve")
    with (
        tracer.start_as_current_span(name, context=context, kind=kind, links=links, attributes=attrs) as span,
        structlog.contextvars.bound_contextvars(request_id=request_id),
    ):  # fmt: skip
        yield span


def itl_attributes(token_times_s: Sequence[float]) -> dict[str, float | int]:
    """Decode-loop summary attributes from the monotonic times tokens were emitted."""
    gaps_ms = sorted(
        (b - a) * 1000.0 for a, b in zip(token_times_s, token_times_s[1:], strict=False)
    )
    out: dict[str, float | int] = {Attr.DECODE_TOKENS: len(token_times_s)}
    if gaps_ms:

        def pick(q: float) -> float:
            return round(gaps_ms[min(len(gaps_ms) - 1, int(q * len(gaps_ms)))], 3)

        out |= {
            Attr.ITL_MEAN_MS: round(sum(gaps_ms) / len(gaps_ms), 3),
            Attr.ITL_P50_MS: pick(0.5),
            Attr.ITL_P99_MS: pick(0.99),
            Attr.ITL_MAX_MS: round(gaps_ms[-1], 3),
        }
    return out


# --- logging -------------------------------------------------------------------------------

_PROMPT_KEYS = frozenset(
    {"prompt", "prompt_text", "messages", "text", "completion", "output_text", "content"}
)
_HANDLER_MARK = "_pdserve_handler"


def _add_trace_ids(_logger: Any, _method: str, event_dict: dict) -> dict:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    return event_dict


class _ServiceAdder:
    def __init__(self, service: str) -> None:
        self.service = service

    def __call__(self, _logger: Any, _method: str, event_dict: dict) -> dict:
        event_dict.setdefault("service", self.service)
        return event_dict


def _redact_prompts(_logger: Any, _method: str, event_dict: dict) -> dict:
    for key in _PROMPT_KEYS.intersection(event_dict):
        value = event_dict[key]
        event_dict[key] = (
            f"<redacted {len(value)} chars>" if isinstance(value, str) else "<redacted>"
        )
    return event_dict


def configure_logging(
    level: str = "info",
    *,
    json: bool | None = None,
    service: str | None = None,
    log_prompts: bool = False,
) -> None:
    """structlog (and stdlib logging) to stderr. ``json`` None: JSON unless stderr is a TTY."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    use_json = (not sys.stderr.isatty()) if json is None else json
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if service:
        shared.append(_ServiceAdder(service))
    shared.append(_add_trace_ids)
    if not log_prompts:
        shared.append(_redact_prompts)
    # A traceback's frame locals hold prompts and completions: shown only with log_prompts.
    if use_json:
        renderer: Any = structlog.processors.JSONRenderer()
        transformer = structlog.tracebacks.ExceptionDictTransformer(show_locals=log_prompts)
        tail = [structlog.processors.ExceptionRenderer(transformer)]
    else:
        formatter = structlog.dev.RichTracebackFormatter(show_locals=log_prompts)
        renderer, tail = structlog.dev.ConsoleRenderer(exception_formatter=formatter), []
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tail,
                renderer,
            ],
        )
    )
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
