"""Local span files: one JSON object per finished span, one file per process run.

The format is written by :class:`SpanFileExporter` (when no OTLP collector is configured)
and read back by ``pdserve trace``. Each line::

    {"trace_id": "<32 hex>", "span_id": "<16 hex>", "parent_span_id": "<16 hex>" | null,
     "name": "...", "kind": "SERVER", "service": "pdserve-router",
     "resource": {...}, "start_ns": 0, "end_ns": 0, "attributes": {...},
     "events": [{"name": "...", "time_ns": 0, "attributes": {...}}],
     "status": {"code": "UNSET" | "OK" | "ERROR", "description": "..."},
     "links": [{"trace_id": "...", "span_id": "...", "attributes": {...}}]}

Writing never raises: an unwritable directory or a full disk drops the batch and logs one
warning until a later write succeeds (telemetry must never fail a request).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

DEFAULT_TRACE_DIR = Path("runs/traces")
SUFFIX = ".spans.jsonl"

# stdlib logging, not structlog: this runs in the exporter thread, possibly before or after
# structlog is configured; telemetry.configure_logging routes stdlib records to structlog.
_log = logging.getLogger("pdserve.telemetry")


def default_trace_dir() -> Path:
    """``$PDSERVE_TRACE_DIR`` if set, else ``./runs/traces``."""
    return Path(os.environ.get("PDSERVE_TRACE_DIR") or DEFAULT_TRACE_DIR)


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def _attrs(attributes: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in (attributes or {}).items()}


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "trace_id": _hex(ctx.trace_id, 32),
        "span_id": _hex(ctx.span_id, 16),
        "parent_span_id": _hex(parent.span_id, 16) if parent is not None else None,
        "name": span.name,
        "kind": span.kind.name,
        "service": span.resource.attributes.get("service.name", "unknown"),
        "resource": {
            k: v
            for k, v in _attrs(span.resource.attributes).items()
            if not k.startswith("telemetry.")
        },
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "attributes": _attrs(span.attributes),
        "events": [
            {"name": e.name, "time_ns": e.timestamp, "attributes": _attrs(e.attributes)}
            for e in span.events
        ],
        "status": {"code": span.status.status_code.name, "description": span.status.description},
        "links": [
            {
                "trace_id": _hex(link.context.trace_id, 32),
                "span_id": _hex(link.context.span_id, 16),
                "attributes": _attrs(link.attributes),
            }
            for link in span.links
        ],
    }


class SpanFileExporter(SpanExporter):
    """Appends finished spans to ``<directory>/<service>-<start time>-<pid>.spans.jsonl``."""

    def __init__(self, directory: Path, service_name: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self.path = Path(directory) / f"{service_name}-{stamp}-{os.getpid()}{SUFFIX}"
        self._lock = threading.Lock()
        self._failing = False
        self._closed = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._closed:
            return SpanExportResult.FAILURE
        try:
            lines = "".join(json.dumps(span_to_dict(s), default=str) + "\n" for s in spans)
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(lines)
        except (OSError, ValueError, TypeError) as exc:
            if not self._failing:
                _log.warning(
                    "span file unwritable, dropping spans until it works: %s (%s)", self.path, exc
                )
            self._failing = True
            return SpanExportResult.FAILURE
        if self._failing:
            _log.info("span file writable again: %s", self.path)
            self._failing = False
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._closed = True

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def span_files(directory: Path) -> list[Path]:
    """Span files in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)


def read_spans(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every span in ``paths``; a torn last line (a process killed mid-write) is skipped."""
    spans = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    span = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(span, dict) and "trace_id" in span and "span_id" in span:
                    spans.append(span)
    return spans
