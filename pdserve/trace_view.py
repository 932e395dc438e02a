"""``pdserve trace``: one request from the local span files, as a waterfall in the terminal.

Reads every ``*.spans.jsonl`` in the trace directory (all services of a local run write
there), picks one trace (by request id, trace id prefix, or the latest), and prints one row
per span in tree order: hop (service@node), span name, start offset from the trace's first
span, duration, a timeline bar, KV bytes and tier/transport. Span events (first token) are
rows of their own; span links (the decode's KV fetch to the prefill that wrote the blocks)
are shown under the span that carries them.

The lines are plain data (:func:`rows`); the terminal table here and the router's console
(:func:`waterfall`, served as JSON under ``/console/api``) both draw from them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pdserve.span_file import read_spans, span_files
from pdserve.telemetry import Attr

Span = dict[str, Any]
_COLORS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")
BAR_WIDTH = 32


class TraceNotFound(LookupError):
    pass


@dataclass
class Trace:
    trace_id: str
    spans: list[Span]

    @property
    def start_ns(self) -> int:
        return min(s["start_ns"] for s in self.spans)

    @property
    def end_ns(self) -> int:
        return max(s["end_ns"] or s["start_ns"] for s in self.spans)

    @property
    def request_id(self) -> str | None:
        for span in sorted(self.spans, key=lambda s: s["start_ns"]):
            value = span["attributes"].get(Attr.REQUEST_ID)
            if value:
                return str(value)
        return None


def load_trace(directory: Path, request_id: str | None = None) -> Trace:
    """The trace of ``request_id`` (or a trace id prefix), else the latest request's trace."""
    spans = read_spans(span_files(directory))
    if not spans:
        raise TraceNotFound(f"no spans in {directory} (is PDSERVE_TRACE_DIR set the same way?)")
    by_trace: dict[str, list[Span]] = defaultdict(list)
    for span in spans:
        by_trace[span["trace_id"]].append(span)
    traces = [Trace(tid, group) for tid, group in by_trace.items()]
    if request_id is not None:
        traces = [t for t in traces if _matches(t, request_id)]
        if not traces:
            raise TraceNotFound(f"no trace for request {request_id!r} in {directory}")
    else:
        # Prefer traces of requests over stray spans (health probes, background work).
        traces = [t for t in traces if t.request_id] or traces
    return max(traces, key=lambda t: t.start_ns)


def _matches(trace: Trace, wanted: str) -> bool:
    if len(wanted) >= 8 and trace.trace_id.startswith(wanted.lower()):
        return True
    keys = (Attr.REQUEST_ID, Attr.RESPONSE_ID)
    return any(str(s["attributes"].get(k)) == wanted for s in trace.spans for k in keys)


def ordered(trace: Trace) -> list[tuple[int, Span]]:
    """(depth, span) in tree order, children by start time; orphans are roots."""
    ids = {s["span_id"] for s in trace.spans}
    children: dict[str | None, list[Span]] = defaultdict(list)
    for span in trace.spans:
        parent = span["parent_span_id"] if span["parent_span_id"] in ids else None
        children[parent].append(span)
    out: list[tuple[int, Span]] = []
    stack = [(0, s) for s in sorted(children[None], key=lambda s: s["start_ns"], reverse=True)]
    while stack:
        depth, span = stack.pop()
        out.append((depth, span))
        kids = sorted(children[span["span_id"]], key=lambda s: s["start_ns"], reverse=True)
        stack.extend((depth + 1, k) for k in kids)
    return out


def _hop(span: Span) -> str:
    service = str(span.get("service", "?")).removeprefix("pdserve-")
    node = span.get("resource", {}).get(Attr.NODE)
    return f"{service}@{node}" if node else service


def _bytes(value: Any) -> str:
    if value is None:
        return ""
    n = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _bar(start_ns: int, end_ns: int, t0: int, total_ns: int, color: str) -> Text:
    lo = int((start_ns - t0) / total_ns * BAR_WIDTH)
    hi = max(lo + 1, round((end_ns - t0) / total_ns * BAR_WIDTH))
    lo, hi = min(lo, BAR_WIDTH - 1), min(hi, BAR_WIDTH)
    return Text(" " * lo + "█" * (hi - lo) + " " * (BAR_WIDTH - hi), style=color)


def _ms(ns: float) -> str:
    return f"{ns / 1e6:,.1f}"


@dataclass(frozen=True)
class Row:
    """One line of the waterfall: a span, one of its events (first token) or one of its links.

    Times are offsets from the trace's first span; an event has no duration, a link neither
    time nor bytes. ``hop`` is the owning span's hop (service@node), so both renderers color
    an event or a link like its span."""

    kind: str  # "span" | "event" | "link"
    depth: int
    hop: str
    name: str
    start_ns: int | None
    duration_ns: int | None
    kv_bytes: int | None = None
    tier: str = ""
    status: str = ""
    span_id: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)


def rows(trace: Trace) -> list[Row]:
    """The waterfall's lines in tree order (what `pdserve trace` and the console show)."""
    t0 = trace.start_ns
    names = {s["span_id"]: s["name"] for s in trace.spans}
    out: list[Row] = []
    for depth, span in ordered(trace):
        attrs, end_ns, hop = span["attributes"], span["end_ns"] or span["start_ns"], _hop(span)
        tier = "/".join(str(attrs[k]) for k in (Attr.KV_TIER, Attr.KV_TRANSPORT) if attrs.get(k))
        status = span["status"]["code"]
        nbytes = attrs.get(Attr.KV_BYTES)
        out.append(Row(
            "span", depth, hop, span["name"], span["start_ns"] - t0, end_ns - span["start_ns"],
            None if nbytes is None else int(nbytes), tier, status if status != "UNSET" else "",
            span["span_id"], attrs,
        ))  # fmt: skip
        for event in span["events"]:
            out.append(Row("event", depth + 1, hop, event["name"], event["time_ns"] - t0, None,
                           attributes=event["attributes"]))  # fmt: skip
        for link in span["links"]:
            target = names.get(
                link["span_id"], f"span {link['span_id']} of trace {link['trace_id'][:8]}"
            )
            out.append(Row("link", depth + 1, hop, f"linked to {target}", None, None,
                           span_id=link["span_id"]))  # fmt: skip
    return out


def waterfall(trace: Trace) -> dict[str, Any]:
    """:func:`rows` as one JSON-ready object (the console's request view)."""
    return {
        "trace_id": trace.trace_id,
        "request_id": trace.request_id,
        "total_ns": max(trace.end_ns - trace.start_ns, 1),
        "hops": sorted({_hop(s) for s in trace.spans}),
        "num_spans": len(trace.spans),
        "rows": [asdict(r) | {"bytes_text": _bytes(r.kv_bytes)} for r in rows(trace)],
    }


def render(trace: Trace, console: Console) -> None:
    t0, total_ns = trace.start_ns, max(trace.end_ns - trace.start_ns, 1)
    services = sorted({_hop(s) for s in trace.spans})
    colors = {hop: _COLORS[i % len(_COLORS)] for i, hop in enumerate(services)}
    console.print(
        f"[bold]trace[/] {trace.trace_id}  [bold]request[/] {trace.request_id or '-'}  "
        f"[bold]total[/] {_ms(total_ns)} ms  [bold]spans[/] {len(trace.spans)}  "
        f"[bold]hops[/] {', '.join(services)}"
    )
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column, justify in (
        ("hop", "left"), ("span", "left"), ("start ms", "right"), ("dur ms", "right"),
        ("timeline", "left"), ("bytes", "right"), ("tier", "left"), ("status", "left"),
    ):  # fmt: skip
        table.add_column(column, justify=justify, no_wrap=True)
    for row in rows(trace):
        table.add_row(*_cells(row, t0, total_ns, colors[row.hop]))
    console.print(table)


def _cells(row: Row, t0: int, total_ns: int, color: str) -> tuple:
    indent = "  " * row.depth
    if row.kind == "link":
        return ("", Text(f"{indent}↳ {row.name}", style="dim"), "", "", "", "", "", "")
    at = t0 + (row.start_ns or 0)
    if row.kind == "event":
        return (
            "", Text(f"{indent}• {row.name}", style="dim"), _ms(at - t0), "",
            _bar(at, at, t0, total_ns, "bold " + color), "", "", "",
        )  # fmt: skip
    return (
        Text(row.hop, style=color), indent + row.name, _ms(at - t0), _ms(row.duration_ns or 0),
        _bar(at, at + (row.duration_ns or 0), t0, total_ns, color), _bytes(row.kv_bytes),
        row.tier, Text(row.status, style="red" if row.status == "ERROR" else ""),
    )  # fmt: skip


def show(directory: Path, request_id: str | None, console: Console | None = None) -> Trace:
    trace = load_trace(directory, request_id)
    render(trace, console or Console())
    return trace
