"""The console's data, without a browser or a server: the span buffer, request summaries,
load percentiles, the cluster view, the span-file tail and the waterfall JSON."""

from __future__ import annotations

import json
import os
import time

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Link, SpanKind

from pdserve.kv.metadata import WorkerInfo
from pdserve.trace_view import Trace, waterfall
from services.router.console_data import (
    RecentSpans,
    RequestSummary,
    SpanFileTail,
    cluster_view,
    load_series,
    percentile,
    route_details,
)

MS = 1_000_000  # ns
T0 = 1_700_000_000_000 * MS  # a fixed wall-clock start, ns


def provider_with(spans: RecentSpans) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "pdserve-router"}))
    provider.add_span_processor(spans)
    return provider


def record_request(tracer, request_id: str, start_ns: int, *, route: str = "disaggregated",
                   ttft_ms: float = 100.0, e2e_ms: float = 400.0, output_tokens: int = 4,
                   reasons: tuple[str, ...] = ("first try",)) -> None:  # fmt: skip
    """One router.request root with a router.route child per reason, at exact times."""
    root = tracer.start_span(
        "router.request", start_time=start_ns, kind=SpanKind.SERVER,
        attributes={"pdserve.request.id": request_id, "gen_ai.usage.input_tokens": 80},
    )  # fmt: skip
    ctx = _context_of(root)
    for i, reason in enumerate(reasons):
        child = tracer.start_span("router.route", context=ctx, start_time=start_ns + i * MS)
        child.set_attributes({
            "pdserve.route.decision": route, "pdserve.route.reason": reason,
            "pdserve.route.scores": json.dumps({"decode": {"d0": 0.5}}),
        })  # fmt: skip
        child.end(end_time=start_ns + i * MS + MS // 2)
    root.add_event("gen_ai.first_token", {"pdserve.ttft_ms": ttft_ms},
                   timestamp=start_ns + int(ttft_ms * MS))  # fmt: skip
    root.set_attributes({
        "pdserve.route.decision": route, "pdserve.route.prefill_worker": "p0",
        "pdserve.route.decode_worker": "d0", "gen_ai.usage.output_tokens": output_tokens,
        "gen_ai.response.finish_reasons": ["length"],
    })  # fmt: skip
    root.end(end_time=start_ns + int(e2e_ms * MS))


def _context_of(span):
    from opentelemetry import trace

    return trace.set_span_in_context(span)


def test_recent_spans_summarize_the_newest_requests_first_and_forget_the_oldest():
    spans = RecentSpans(max_traces=2)
    tracer = provider_with(spans).get_tracer("test")
    record_request(tracer, "a", T0)
    record_request(tracer, "b", T0 + 1000 * MS, route="local", reasons=("retry", "final"))
    record_request(tracer, "c", T0 + 2000 * MS, ttft_ms=50.0, e2e_ms=350.0, output_tokens=7)
    got = spans.requests()
    assert [r.request_id for r in got] == ["c", "b"]  # "a" was the oldest of three traces
    c = got[0]
    assert (c.ttft_ms, c.e2e_ms, c.itl_ms) == (50.0, 350.0, 50.0)  # (350 - 50) / (7 - 1)
    assert (c.num_prompt_tokens, c.num_output_tokens, c.finish_reason) == (80, 7, "length")
    assert (c.route, c.prefill_worker, c.decode_worker) == ("disaggregated", "p0", "d0")
    assert c.started_unix_ms == (T0 + 2000 * MS) / 1e6 and c.error == ""
    assert got[1].reason == "final"  # the last routing decision explains the route taken
    [root] = [s for s in spans.spans(c.trace_id) if s["name"] == "router.request"]
    assert root["attributes"]["pdserve.request.id"] == "c"


def test_route_details_read_the_last_decision_and_its_scores():
    spans = RecentSpans()
    tracer = provider_with(spans).get_tracer("test")
    record_request(tracer, "r", T0, reasons=("prefill failed", "uncached 80 >= threshold 32"))
    details = route_details(spans.spans(spans.requests()[0].trace_id))
    assert details == {
        "decision": "disaggregated", "reason": "uncached 80 >= threshold 32", "reason_class": "",
        "prefill_worker": "", "decode_worker": "", "scores": {"decode": {"d0": 0.5}},
        "attempts": 2,
    }  # fmt: skip
    assert route_details([]) is None


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(10, 0, -1)]
    assert [percentile(values, q) for q in (0.5, 0.9, 0.99, 1.0)] == [5.0, 9.0, 10.0, 10.0]
    assert percentile([], 0.5) is None


def summary(end_s: float, ttft_ms: float | None, itl_ms: float | None, tokens: int,
            finish: str = "length") -> RequestSummary:  # fmt: skip
    e2e_ms = 1000.0
    return RequestSummary(
        request_id=f"r{end_s}", trace_id="t", started_unix_ms=end_s * 1000 - e2e_ms,
        e2e_ms=e2e_ms, ttft_ms=ttft_ms, itl_ms=itl_ms, num_prompt_tokens=1,
        num_output_tokens=tokens, finish_reason=finish, route="local", reason="",
        prefill_worker="", decode_worker="", error="",
    )  # fmt: skip


def test_load_series_buckets_requests_by_their_finish_time():
    now = 10_000.0
    requests = [
        summary(now - 25, 100.0, 10.0, 20),  # bucket 0 of [now-30, now)
        summary(now - 15, 200.0, 20.0, 30),  # bucket 1
        summary(now - 12, 400.0, None, 1),  # bucket 1, one token: no ITL
        summary(now - 1, None, None, 0, finish="error"),  # bucket 2
        summary(now - 31, 999.0, 99.0, 100),  # before the window
        summary(now + 1, 999.0, 99.0, 100),  # after now (clock skew): left out
    ]
    series = load_series(requests, now, window_s=30, bucket_s=10)
    assert series["window_s"] == 30 and series["bucket_s"] == 10
    assert series["overall"] == {
        "requests": 4, "errors": 1, "tokens_per_s": round(51 / 30, 3),
        "ttft_ms": {"p50": 200.0, "p90": 400.0, "p99": 400.0},
        "itl_ms": {"p50": 10.0, "p90": 20.0, "p99": 20.0},
    }  # fmt: skip
    b = series["buckets"]
    assert [x["start_unix_s"] for x in b] == [now - 30, now - 20, now - 10]
    assert [x["requests"] for x in b] == [1, 2, 1]
    assert [x["tokens_per_s"] for x in b] == [2.0, 3.1, 0.0]
    assert b[1]["ttft_ms"] == {"p50": 200.0, "p90": 400.0, "p99": 400.0}
    assert b[2]["ttft_ms"]["p50"] is None and b[2]["errors"] == 1
    with pytest.raises(ValueError, match="bucket_s"):
        load_series([], now, window_s=10, bucket_s=20)


def test_cluster_view_orders_roles_and_reads_each_heartbeat():
    now_ms = 1_000_000

    def worker(worker_id, role, capacity, load, age_ms=0) -> WorkerInfo:
        return WorkerInfo(worker_id, role, "h:1", "n1", capacity, load, 0, now_ms - age_ms)

    kv_load = {"dram": 0.5, "ssd": 0.0, "num_hits": 3, "num_misses": 1,
               "num_evicted_dram": 2, "num_evicted_ssd": 0}  # fmt: skip
    decode_load = {"running": 2, "waiting": 1, "num_free_blocks": 16, "num_cached_blocks": 5}
    workers = [
        worker("kv-1", "kvstore", {"dram": 1000, "ssd": 4000}, kv_load, age_ms=1_000),
        worker("d-1", "decode", {"num_blocks": 64}, decode_load, age_ms=5_000),
        worker("p-1", "prefill", {"num_blocks": 32}, {"num_free_blocks": 32, "step_ms": 12.5}),
        worker("r-1", "router", {}, {"running": 3}),
    ]
    views = cluster_view(workers, now_ms, heartbeat_interval_s=2.0)
    assert [v["worker_id"] for v in views] == ["r-1", "p-1", "d-1", "kv-1"]
    router, prefill, decode, kv = views
    assert router["running"] == 3
    assert (prefill["kv_used_ratio"], prefill["state"], prefill["step_ms"]) == (0.0, "up", 12.5)
    assert decode["kv_used_ratio"] == 0.75 and decode["num_cached_blocks"] == 5
    assert (decode["running"], decode["waiting"]) == (2, 1)
    assert (decode["state"], decode["heartbeat_age_s"]) == ("late", 5.0)  # > 2 intervals
    assert decode["step_ms"] is None  # not reported by this worker
    assert kv["tiers"] == [
        {"tier": "dram", "capacity_bytes": 1000, "used_ratio": 0.5, "num_evicted": 2},
        {"tier": "ssd", "capacity_bytes": 4000, "used_ratio": 0.0, "num_evicted": 0},
    ]
    assert (kv["hit_rate"], kv["num_hits"], kv["heartbeat_age_s"]) == (0.75, 3, 1.0)


def span_line(trace_id: str, span_id: str, name: str) -> str:
    return json.dumps({
        "trace_id": trace_id, "span_id": span_id, "parent_span_id": None, "name": name,
        "kind": "INTERNAL", "service": "pdserve-decode", "resource": {}, "start_ns": 1,
        "end_ns": 2, "attributes": {}, "events": [], "status": {"code": "UNSET"}, "links": [],
    }) + "\n"  # fmt: skip


def test_span_file_tail_reads_new_complete_lines_of_this_runs_files(tmp_path):
    old = tmp_path / "decode-old.spans.jsonl"
    old.write_text(span_line("t1", "00", "from.an.earlier.run"))
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    tail = SpanFileTail(tmp_path, since_unix_s=time.time() - 60)
    current = tmp_path / "decode-now.spans.jsonl"
    current.write_text(span_line("t1", "01", "kv.fetch") + span_line("t1", "02", "dec")[:30])
    tail.poll()
    assert [s["name"] for s in tail.spans("t1")] == ["kv.fetch"]  # the torn line waits
    with open(current, "a") as f:
        f.write(span_line("t1", "02", "dec")[30:] + "not json\n" + span_line("t2", "03", "x"))
    tail.poll()
    assert [s["name"] for s in tail.spans("t1")] == ["kv.fetch", "dec"]
    assert [s["span_id"] for s in tail.spans("t2")] == ["03"]
    tail.poll()  # nothing new: nothing read twice
    assert len(tail.spans("t1")) == 2


def test_waterfall_json_has_the_terminal_rows():
    spans = RecentSpans()
    provider = TracerProvider(resource=Resource.create({
        "service.name": "pdserve-prefill", "pdserve.node.id": "node-b",
    }))  # fmt: skip
    provider.add_span_processor(spans)
    tracer = provider.get_tracer("test")
    root = tracer.start_span("prefill.request", start_time=T0)
    put = tracer.start_span(
        "kv.put", context=_context_of(root), start_time=T0 + 2 * MS,
        links=[Link(root.get_span_context())],
        attributes={"pdserve.kv.bytes": 1_474_560, "pdserve.kv.tier": "dram",
                    "pdserve.kv.transport": "shm"},
    )  # fmt: skip
    put.add_event("gen_ai.first_token", timestamp=T0 + 3 * MS)
    put.end(end_time=T0 + 4 * MS)
    root.end(end_time=T0 + 10 * MS)
    trace_id = format(root.get_span_context().trace_id, "032x")
    got = waterfall(Trace(trace_id, spans.spans(trace_id)))
    assert (got["trace_id"], got["total_ns"], got["hops"]) == (
        trace_id,
        10 * MS,
        ["prefill@node-b"],
    )
    rows = [(r["kind"], r["depth"], r["name"], r["start_ns"], r["duration_ns"], r["kv_bytes"],
             r["bytes_text"], r["tier"]) for r in got["rows"]]  # fmt: skip
    assert rows == [
        ("span", 0, "prefill.request", 0, 10 * MS, None, "", ""),
        ("span", 1, "kv.put", 2 * MS, 2 * MS, 1_474_560, "1.4 MiB", "dram/shm"),
        ("event", 2, "gen_ai.first_token", 3 * MS, None, None, "", ""),
        ("link", 2, "linked to prefill.request", None, None, None, "", ""),
    ]
