"""What the operator console shows, as plain data: requests, their traces, load, the cluster.

- :class:`RecentSpans` is a span processor on the router's own tracer provider: it keeps the
  router's finished spans of the last ``max_traces`` traces in memory (whatever the exporter),
  so the request list and the load charts need neither span files nor a collector.
- :class:`SpanFileTail` follows the local span files that every process of a local run writes
  (no OTLP endpoint), so a request's waterfall also holds the prefill, KV store and decode hops.
- :func:`summarize`, :func:`load_series` and :func:`cluster_view` are pure functions of those
  spans and of the worker registry's entries; the console's HTTP handlers (console.py) only
  serialize what they return.

Only requests whose trace was sampled are seen (``trace_sampling_ratio``). No prompt or
completion text is in any span, so none reaches the console.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

from pdserve.kv.metadata import WorkerInfo
from pdserve.span_file import span_files, span_to_dict
from pdserve.telemetry import Attr, Event

Span = dict[str, Any]
ROOT_SPAN = "router.request"
ROUTE_SPAN = "router.route"
ROLE_ORDER = ("router", "prefill", "decode", "kvstore")
T = TypeVar("T")


class _TraceGroups(Generic[T]):
    """Items (spans) grouped by trace id and keyed by span id; the ``max_traces`` most
    recently touched traces are kept (LRU)."""

    def __init__(self, max_traces: int) -> None:
        if max_traces < 1:
            raise ValueError(f"max_traces must be >= 1 (got {max_traces})")
        self.max_traces = max_traces
        self._groups: OrderedDict[str, dict[str, T]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, items: Iterable[tuple[str, str, T]]) -> None:
        """``(trace_id, span_id, item)`` triples."""
        with self._lock:
            for trace_id, span_id, item in items:
                self._groups.setdefault(trace_id, {})[span_id] = item
                self._groups.move_to_end(trace_id)
                while len(self._groups) > self.max_traces:
                    self._groups.popitem(last=False)

    def get(self, trace_id: str) -> list[T]:
        with self._lock:
            return list(self._groups.get(trace_id, {}).values())


class RecentSpans(SpanProcessor):
    """The router's finished spans of its last ``max_traces`` traces, and a summary of each
    of its last ``max_traces`` requests, in memory.

    ``on_end`` runs in the thread that ends the span (the router's event loop), so it only
    files the span away; a request's summary is made once, when its ``router.request`` ends,
    and spans are turned into the span files' format only when a request is opened."""

    def __init__(self, max_traces: int = 1024) -> None:
        self._traces: _TraceGroups[ReadableSpan] = _TraceGroups(max_traces)
        self._requests: deque[RequestSummary] = deque(maxlen=max_traces)

    def on_start(self, span, parent_context=None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.get_span_context()
        trace_id = format(ctx.trace_id, "032x")
        self._traces.add([(trace_id, format(ctx.span_id, "016x"), span)])
        if span.name == ROOT_SPAN:
            routes = [s for s in self._traces.get(trace_id) if s.name == ROUTE_SPAN]
            last = max(routes, key=lambda s: s.start_time or 0, default=None)
            route = None if last is None else _summary_fields(last, trace_id)
            self._requests.append(summarize(_summary_fields(span, trace_id), route))

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True

    def spans(self, trace_id: str) -> list[Span]:
        return [span_to_dict(s) for s in self._traces.get(trace_id)]

    def requests(self) -> list[RequestSummary]:
        """The summaries of the last ``max_traces`` finished requests, newest first."""
        return sorted(self._requests, key=lambda r: r.started_unix_ms, reverse=True)


def _summary_fields(span: ReadableSpan, trace_id: str) -> Span:
    """What :func:`summarize` reads, without the resource: ``span_to_dict`` costs several
    times more, and this runs on the router's event loop for every request."""
    return {
        "trace_id": trace_id,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events],
        "status": {"code": span.status.status_code.name, "description": span.status.description},
    }


def _start(span: Span) -> int:
    return span["start_ns"]


class SpanFileTail:
    """The spans of this run's local span files, read incrementally (new lines only).

    Files last modified before ``since_unix_s`` (earlier runs) are skipped; a line still
    being written is read on a later poll."""

    def __init__(self, directory: Path, since_unix_s: float, max_traces: int = 1024) -> None:
        self.directory = Path(directory)
        self._since_unix_s = since_unix_s
        self._offsets: dict[Path, int] = {}
        self._traces: _TraceGroups[Span] = _TraceGroups(max_traces)
        self._lock = threading.Lock()

    def poll(self) -> None:
        with self._lock:
            for path in span_files(self.directory):
                try:
                    if path.stat().st_mtime < self._since_unix_s:
                        continue
                    self._read_new(path)
                except OSError:  # a file removed under us: its spans are gone
                    continue

    def _read_new(self, path: Path) -> None:
        offset = self._offsets.get(path, 0)
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offsets[path] = offset + len(complete)
        spans = []
        for line in complete.splitlines():
            try:
                span = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(span, dict) and "trace_id" in span and "span_id" in span:
                spans.append((span["trace_id"], span["span_id"], span))
        self._traces.add(spans)

    def spans(self, trace_id: str) -> list[Span]:
        return self._traces.get(trace_id)


# ---- requests ----


@dataclass(frozen=True)
class RequestSummary:
    """One finished request, from its ``router.request`` span and its last ``router.route``."""

    request_id: str
    trace_id: str
    started_unix_ms: float
    e2e_ms: float
    ttft_ms: float | None
    itl_ms: float | None  # mean gap between output tokens after the first
    num_prompt_tokens: int | None
    num_output_tokens: int
    finish_reason: str
    route: str  # disaggregated | local | none
    reason: str
    prefill_worker: str
    decode_worker: str
    error: str

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))  # flat fields: no need for asdict's deep copy


def summarize(root: Span, route: Span | None) -> RequestSummary:
    a = root["attributes"]
    end_ns = root["end_ns"] or root["start_ns"]
    e2e_ms = (end_ns - root["start_ns"]) / 1e6
    ttft_ms = next(
        (e["attributes"].get("pdserve.ttft_ms") for e in root["events"]
         if e["name"] == Event.FIRST_TOKEN),
        None,
    )  # fmt: skip
    n = int(a.get(Attr.OUTPUT_TOKENS, 0))
    itl_ms = (e2e_ms - ttft_ms) / (n - 1) if ttft_ms is not None and n > 1 else None
    reasons = a.get(Attr.FINISH_REASONS) or ["-"]
    status = root["status"]
    return RequestSummary(
        request_id=str(a.get(Attr.REQUEST_ID, "")),
        trace_id=root["trace_id"],
        started_unix_ms=root["start_ns"] / 1e6,
        e2e_ms=round(e2e_ms, 3),
        ttft_ms=None if ttft_ms is None else round(float(ttft_ms), 3),
        itl_ms=None if itl_ms is None else round(itl_ms, 3),
        num_prompt_tokens=a.get(Attr.INPUT_TOKENS),
        num_output_tokens=n,
        finish_reason=str(reasons[0]),
        route=str(a.get(Attr.ROUTE, "none")),
        reason=str(route["attributes"].get(Attr.ROUTE_REASON, "")) if route else "",
        prefill_worker=str(a.get(Attr.ROUTE_PREFILL_WORKER, "")),
        decode_worker=str(a.get(Attr.ROUTE_DECODE_WORKER, "")),
        error=(status.get("description") or "") if status["code"] == "ERROR" else "",
    )


def route_details(spans: Sequence[Span]) -> dict[str, Any] | None:
    """The last routing decision of a trace: decision, why, and every candidate's score."""
    routes = sorted((s for s in spans if s["name"] == ROUTE_SPAN), key=_start)
    if not routes:
        return None
    a = routes[-1]["attributes"]
    try:
        scores = json.loads(a.get(Attr.ROUTE_SCORES, "{}"))
    except json.JSONDecodeError:
        scores = {}
    return {
        "decision": a.get(Attr.ROUTE, "none"),
        "reason": a.get(Attr.ROUTE_REASON, ""),
        "reason_class": a.get("pdserve.route.reason_class", ""),
        "prefill_worker": a.get(Attr.ROUTE_PREFILL_WORKER, ""),
        "decode_worker": a.get(Attr.ROUTE_DECODE_WORKER, ""),
        "scores": scores,
        "attempts": len(routes),
    }


# ---- load over time ----


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _stats(requests: Sequence[RequestSummary], span_s: float) -> dict[str, Any]:
    ttft = [r.ttft_ms for r in requests if r.ttft_ms is not None]
    itl = [r.itl_ms for r in requests if r.itl_ms is not None]
    return {
        "requests": len(requests),
        "errors": sum(r.finish_reason == "error" for r in requests),
        "tokens_per_s": round(sum(r.num_output_tokens for r in requests) / span_s, 3),
        "ttft_ms": {f"p{q}": percentile(ttft, q / 100) for q in (50, 90, 99)},
        "itl_ms": {f"p{q}": percentile(itl, q / 100) for q in (50, 90, 99)},
    }


def load_series(
    requests: Sequence[RequestSummary], now_unix_s: float, window_s: float, bucket_s: float
) -> dict[str, Any]:
    """TTFT / ITL percentiles and output tokens/s of the requests that finished in the last
    ``window_s``, overall and per ``bucket_s`` bucket (oldest first; the last one ends now)."""
    if not 0 < bucket_s <= window_s:
        raise ValueError(f"need 0 < bucket_s <= window_s (got {bucket_s}, {window_s})")
    num_buckets = math.ceil(window_s / bucket_s)
    start_s = now_unix_s - num_buckets * bucket_s
    buckets: list[list[RequestSummary]] = [[] for _ in range(num_buckets)]
    for r in requests:
        end_s = (r.started_unix_ms + r.e2e_ms) / 1000
        if start_s <= end_s <= now_unix_s:
            buckets[min(int((end_s - start_s) // bucket_s), num_buckets - 1)].append(r)
    return {
        "window_s": num_buckets * bucket_s,
        "bucket_s": bucket_s,
        "overall": _stats([r for b in buckets for r in b], num_buckets * bucket_s),
        "buckets": [
            {"start_unix_s": round(start_s + i * bucket_s, 3), **_stats(b, bucket_s)}
            for i, b in enumerate(buckets)
        ],
    }


# ---- the cluster ----


def _engine_view(w: WorkerInfo) -> dict[str, Any]:
    num_blocks = int(w.capacity.get("num_blocks", 0))
    free = w.load.get("num_free_blocks")
    used = None if not num_blocks or free is None else round(1 - free / num_blocks, 4)
    return {
        "running": int(w.load.get("running", 0)),
        "waiting": int(w.load.get("waiting", 0)),
        "num_kv_blocks": num_blocks,
        "kv_used_ratio": used,
        "num_cached_blocks": w.load.get("num_cached_blocks"),
        "step_ms": w.load.get("step_ms"),
    }


def _kvstore_view(w: WorkerInfo) -> dict[str, Any]:
    """Tiers are the capacity's keys (``hbm``/``dram``/``ssd``); load holds each one's used
    share and ``num_evicted_<tier>`` (blocks pushed out of it), and the store's hits/misses."""
    tiers = [
        {
            "tier": tier, "capacity_bytes": int(cap), "used_ratio": w.load.get(tier),
            "num_evicted": w.load.get(f"num_evicted_{tier}"),
        }
        for tier, cap in w.capacity.items()
    ]  # fmt: skip
    hits, misses = w.load.get("num_hits"), w.load.get("num_misses")
    lookups = (hits or 0) + (misses or 0)
    return {
        "tiers": tiers,
        "num_hits": hits,
        "num_misses": misses,
        "hit_rate": round(hits / lookups, 4) if hits is not None and lookups else None,
    }


def worker_view(w: WorkerInfo, now_unix_ms: int, heartbeat_interval_s: float) -> dict[str, Any]:
    """One registry entry for the console; ``late``: no heartbeat for two intervals."""
    age_s = max(0.0, (now_unix_ms - w.heartbeat_unix_ms) / 1000)
    out: dict[str, Any] = {
        "worker_id": w.worker_id,
        "role": w.role,
        "node_id": w.node_id,
        "address": w.address,
        "state": "late" if age_s > 2 * heartbeat_interval_s else "up",
        "heartbeat_age_s": round(age_s, 3),
    }
    if w.role in ("prefill", "decode"):
        out |= _engine_view(w)
    elif w.role == "kvstore":
        out |= _kvstore_view(w)
    elif w.role == "router":
        out["running"] = int(w.load.get("running", 0))
    return out


def cluster_view(
    workers: Sequence[WorkerInfo], now_unix_ms: int, heartbeat_interval_s: float
) -> list[dict[str, Any]]:
    """Every registered worker, by role (router, prefill, decode, kvstore), node and id."""

    def order(w: WorkerInfo) -> tuple:
        rank = ROLE_ORDER.index(w.role) if w.role in ROLE_ORDER else len(ROLE_ORDER)
        return rank, w.node_id, w.worker_id

    return [worker_view(w, now_unix_ms, heartbeat_interval_s) for w in sorted(workers, key=order)]
