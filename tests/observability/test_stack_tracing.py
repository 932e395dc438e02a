"""The real stack (``pdserve up``'s launcher: Redis, kvstore, 1 prefill, 1 decode and the router
as child processes, the real model) traced end to end, once per exporter.

- OTLP: every child exports to a receiver started by the test; one disaggregated request is
  one trace across the four services (told apart by their ``service.name``), with the
  parent/child chain, the KV handoff's link and equal byte counts on every side; the router's
  log lines carry the trace id; its ``/metrics`` count the requests made; then the receiver
  goes away and requests still succeed.
- Span files: no collector; ``pdserve trace --last`` renders all four hops; an HTTP caller's
  ``traceparent`` makes the request part of the caller's trace.

One stack at a time (class-scoped), tiny outputs: about a minute in all on two cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from pdserve.cli import app
from pdserve.client import Client
from pdserve.launcher import Stack, StackConfig
from pdserve.span_file import read_spans, span_files
from pdserve.telemetry import Attr, Event
from tests.observability.test_services_tracing import _otlp_spans
from tests.observability.test_telemetry import start_otlp_receiver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BLOCK_SIZE = 16
BLOCK_BYTES = 737_280
MAX_TOKENS = 2
STACK_ENV = {
    "PDSERVE_ROUTER_DISAGG_THRESHOLD_TOKENS": "32",
    # The static rule, so that a long prompt is disaggregated on an idle stack (the cost
    # policy would prefill it on the idle decode worker: faster by the handoff).
    "PDSERVE_ROUTER_DISAGGREGATION_POLICY": "threshold",
    # The overlapped handoff (pdserve up's default, stated here because the link below
    # depends on it): the decode's kv.fetch links to the prefill span it learns from
    # Prefill.Handoff, before the prefill's response exists.
    "PDSERVE_ROUTER_OVERLAP_HANDOFF": "true",
    # The exact fp32 path: BLOCK_BYTES is an fp32 block (int4 weights keep a bf16 KV cache).
    "PDSERVE_PREFILL_QUANTIZATION": "none",
    "PDSERVE_DECODE_QUANTIZATION": "none",
    "PDSERVE_ROUTER_QUANTIZATION": "none",
    "PDSERVE_PREFILL_KV_CACHE_BYTES": str(64 * BLOCK_BYTES),
    "PDSERVE_DECODE_KV_CACHE_BYTES": str(64 * BLOCK_BYTES),
    "PDSERVE_KVSTORE_DRAM_CAPACITY_BYTES": str(128 * BLOCK_BYTES),
    "PDSERVE_PREFILL_NUM_THREADS": "1",
    "PDSERVE_DECODE_NUM_THREADS": "1",
    "PDSERVE_LOG_LEVEL": "info",
}
SECRET = "zebra-violet-quartz"  # must never reach a log line
SERVICES = {"pdserve-router", "pdserve-prefill", "pdserve-kvstore", "pdserve-decode"}


def long_prompt(i: int) -> str:
    """About 80 tokens, different from the first token on: disaggregated, nothing cached."""
    return f"{i} {SECRET}. " + "Rivers carve valleys and mountains rise where plates collide. " * 6


def start_stack(tmp_path_factory, name: str, env: dict[str, str]) -> Stack:
    if os.environ.get("PDSERVE_E2E", "1") != "1":
        pytest.skip("PDSERVE_E2E=0")
    config = StackConfig(
        num_prefill=1, num_decode=1, default_ports=False, env={**STACK_ENV, **env},
        log_dir=tmp_path_factory.mktemp(f"{name}-logs"), startup_timeout_s=240,
        cluster_name=f"{name}{os.getpid()}",
    )  # fmt: skip
    stack = Stack(config)
    stack.start()
    return stack


def generate(stack: Stack, request_id: str, i: int):
    with Client(stack.grpc_address, timeout_s=120) as client:
        done = client.generate(
            long_prompt(i), max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
            request_id=request_id,
        )  # fmt: skip
    assert done.route.disaggregated, done.route
    assert done.usage.completion_tokens == MAX_TOKENS
    return done


# --- one trace ---------------------------------------------------------------------------------


def _kv_bytes(trace: list[dict], name: str, service: str) -> int:
    return sum(s["attributes"][Attr.KV_BYTES] for s in trace
               if s["name"] == name and s["service"] == service)  # fmt: skip


def wait_for_trace(read, request_id: str, timeout_s: float = 20.0) -> list[dict]:
    """The request's spans once every service's last span (exported ~1 s later) is in: each
    service exports its spans in batches of its own, so one of the kvstore's spans can be in
    while its puts are still in the next batch (seen on a loaded CI machine); the trace is
    complete when the store has served every byte the prefill put and the decode fetched."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = read()
        roots = [s for s in spans if s["attributes"].get(Attr.REQUEST_ID) == request_id
                 and s["name"] == "router.request"]  # fmt: skip
        if roots:
            trace = [s for s in spans if s["trace_id"] == roots[0]["trace_id"]]
            names = {s["name"] for s in trace}
            if (
                {"decode.request", "kv.get", "kv.fetch", "prefill.request"} <= names
                and {s["service"] for s in trace} >= SERVICES
                and _kv_bytes(trace, "kv.put", "pdserve-kvstore")
                == _kv_bytes(trace, "kv.put", "pdserve-prefill")
                and _kv_bytes(trace, "kv.get", "pdserve-kvstore")
                == _kv_bytes(trace, "kv.fetch", "pdserve-decode")
            ):
                return trace
        if time.monotonic() > deadline:
            return [s for s in spans if roots and s["trace_id"] == roots[0]["trace_id"]]
        time.sleep(0.2)


def test_wait_for_trace_waits_for_the_kvstores_later_batch():
    def span(name: str, service: str, **attributes) -> dict:
        return {"trace_id": "t", "name": name, "service": f"pdserve-{service}",
                "attributes": {Attr.KV_BYTES: 0, **attributes}}  # fmt: skip

    first_batches = [
        span("router.request", "router", **{Attr.REQUEST_ID: "r"}),
        span("prefill.request", "prefill"), span("kv.put", "prefill", **{Attr.KV_BYTES: 8}),
        span("decode.request", "decode"), span("kv.fetch", "decode", **{Attr.KV_BYTES: 8}),
        span("pdserve.v1.KVStore/OpenSharedMemory", "kvstore"),
        span("kv.get", "kvstore", **{Attr.KV_BYTES: 8}),
    ]  # fmt: skip
    complete = first_batches + [span("kv.put", "kvstore", **{Attr.KV_BYTES: 8})]
    reads = iter([first_batches, first_batches, complete])
    assert wait_for_trace(lambda: next(reads, complete), "r", timeout_s=5) == complete


def check_trace(spans: list[dict], request_id: str) -> str:
    """One disaggregated request across the four services; returns its trace id."""
    assert {s["service"] for s in spans} >= SERVICES, sorted({s["service"] for s in spans})
    assert len({s["trace_id"] for s in spans}) == 1
    by_id = {s["span_id"]: s for s in spans}

    def one(name: str, service: str, kind: str | None = None) -> dict:
        found = [s for s in spans if s["name"] == name and s["service"] == service
                 and (kind is None or s["kind"] == kind)]  # fmt: skip
        assert len(found) == 1, (name, service, kind, len(found))
        return found[0]

    def parent(span: dict) -> dict:
        return by_id[span["parent_span_id"]]

    def ancestors(span: dict) -> list[dict]:
        out = []
        while span["parent_span_id"] in by_id:
            span = parent(span)
            out.append(span)
        return out

    # The router: the root, its decision, admission, and the two worker calls under it.
    root = one("router.request", "pdserve-router")
    assert root["parent_span_id"] is None and root["kind"] == "SERVER"
    a = root["attributes"]
    assert a[Attr.REQUEST_ID] == request_id and a[Attr.ROUTE] == "disaggregated"
    assert a[Attr.MAX_TOKENS] == MAX_TOKENS and a[Attr.OUTPUT_TOKENS] == MAX_TOKENS
    assert list(a[Attr.FINISH_REASONS]) == ["length"]
    num_prompt_tokens = a[Attr.INPUT_TOKENS]
    assert num_prompt_tokens > 32
    assert [e["name"] for e in root["events"]] == [Event.FIRST_TOKEN, Event.FINISH]
    route = one("router.route", "pdserve-router")
    assert parent(route) is root
    assert route["attributes"][Attr.ROUTE] == "disaggregated"
    assert route["attributes"]["pdserve.route.reason_class"] == "uncached_above_threshold"
    assert ">= threshold 32" in route["attributes"][Attr.ROUTE_REASON]
    scores = json.loads(route["attributes"][Attr.ROUTE_SCORES])
    assert set(scores) == {"decode", "prefill"}
    assert route["attributes"][Attr.ROUTE_DECODE_WORKER] in scores["decode"]
    assert route["attributes"][Attr.ROUTE_PREFILL_WORKER] in scores["prefill"]
    assert parent(one("router.admission", "pdserve-router")) is root
    for service, rpc in (("prefill", "Prefill/Prefill"), ("decode", "Decode/Decode")):
        client = one(f"pdserve.v1.{rpc}", "pdserve-router", "CLIENT")
        server = one(f"pdserve.v1.{rpc}", f"pdserve-{service}", "SERVER")
        assert parent(client) is root and parent(server) is client
        assert parent(one(f"{service}.request", f"pdserve-{service}")) is server
    # The handoff: the decode's fetch is linked to the prefill that wrote the blocks.
    p_request = one("prefill.request", "pdserve-prefill")
    fetch = one("kv.fetch", "pdserve-decode")
    assert [ln["span_id"] for ln in fetch["links"]] == [p_request["span_id"]]
    assert p_request in ancestors(fetch) or root in ancestors(fetch)
    # Byte counts: what the prefill put, the store took, the decode fetched and the store gave.
    nbytes = (num_prompt_tokens // BLOCK_SIZE) * BLOCK_BYTES

    assert _kv_bytes(spans, "kv.put", "pdserve-prefill") == nbytes
    assert _kv_bytes(spans, "kv.put", "pdserve-kvstore") == nbytes
    assert fetch["attributes"][Attr.KV_BYTES] == nbytes
    assert _kv_bytes(spans, "kv.get", "pdserve-kvstore") == nbytes
    for s in spans:
        if s["service"] == "pdserve-kvstore":
            assert root in ancestors(s), s["name"]
    assert all(s["status"]["code"] != "ERROR" for s in spans)
    return root["trace_id"]


# --- metrics and logs --------------------------------------------------------------------------


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def log_lines(stack: Stack, name: str) -> list[dict]:
    text = stack.child(name).log_path.read_text(errors="replace")
    return [json.loads(x) for x in text.splitlines() if x.startswith("{")]


# --- OTLP ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def held_port():
    """A free port, bound here with SO_REUSEPORT for the block: no other process can take it,
    and a gRPC server of this process (gRPC sets SO_REUSEPORT) can bind it beside this socket
    (which does not listen, so it receives no connection)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture(scope="class")
def otlp_stack(tmp_path_factory):
    """(stack, receiver). The receiver starts after the children: forking while a gRPC server
    runs in this process can abort the child (grpc skips its fork handlers when busy). Its
    port is held from before the children learn it until the receiver has bound it."""
    with held_port() as port:
        endpoint = f"http://127.0.0.1:{port}"
        stack = start_stack(tmp_path_factory, "otlp", {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
        receiver = start_otlp_receiver(port)
    yield stack, receiver
    stack.stop()
    receiver.stop()


class TestOtlpStack:
    @pytest.fixture
    def stack(self, otlp_stack):
        return otlp_stack[0]

    @pytest.fixture
    def receiver(self, otlp_stack):
        return otlp_stack[1]

    def test_one_trace_across_router_prefill_kvstore_and_decode(self, stack, receiver):
        generate(stack, "otlp-1", 1)
        spans = wait_for_trace(lambda: _otlp_spans(receiver), "otlp-1")
        trace_id = check_trace(spans, "otlp-1")
        # The router's log lines for the request carry its trace id, never the prompt.
        lines = [x for x in log_lines(stack, "router") if x.get("request_id") == "otlp-1"]
        events = {x["event"] for x in lines}
        assert {"router.routed", "router.finished"} <= events, events
        assert all(x["trace_id"] == trace_id and len(x["span_id"]) == 16 for x in lines)
        assert all(x["service"] == "pdserve-router" for x in lines)
        for child in ("router", "prefill-0", "decode-0", "kvstore"):
            assert SECRET not in stack.child(child).log_path.read_text(errors="replace")

    def test_router_metrics_count_the_requests_made(self, stack):
        before = scrape(stack.http_url)
        num_requests = 2
        for i in range(num_requests):
            generate(stack, f"metrics-{i}", 10 + i)
        after = scrape(stack.http_url)

        def delta(name: str, **labels) -> float:
            key = (name, tuple(sorted(labels.items())))
            return after.get(key, 0.0) - before.get(key, 0.0)

        disagg = {"route": "disaggregated"}
        assert delta("pdserve_requests_total", finish_reason="length", **disagg) == num_requests
        assert delta("pdserve_requests_total", finish_reason="error", **disagg) == 0
        assert delta("pdserve_time_to_first_token_seconds_count", **disagg) == num_requests
        assert delta("pdserve_time_per_output_token_seconds_count", **disagg) == num_requests
        assert delta(
            "pdserve_e2e_request_latency_seconds_count", finish_reason="length", **disagg
        ) == num_requests  # fmt: skip
        assert delta(
            "pdserve_route_decisions_total", reason="uncached_above_threshold", **disagg
        ) == num_requests  # fmt: skip
        assert delta("pdserve_generation_tokens_total") == num_requests * MAX_TOKENS
        assert delta("pdserve_queue_wait_seconds_count", queue="router_admitted") == num_requests
        assert after[("pdserve_queue_depth_requests", (("queue", "router_admitted"),))] == 0
        assert after[("pdserve_workers", (("role", "decode"),))] == 1
        assert after[("pdserve_workers", (("role", "prefill"),))] == 1
        assert ("pdserve_redis_errors_total", (("operation", "registry"),)) not in after
        ttft_sum = delta("pdserve_time_to_first_token_seconds_sum", **disagg)
        assert 0 < ttft_sum < delta("pdserve_e2e_request_latency_seconds_sum",
                                    finish_reason="length", **disagg)  # fmt: skip

    def test_collector_down_never_fails_a_request(self, stack, receiver):
        receiver.stop()  # the endpoint is now a closed port
        done = generate(stack, "down-1", 20)
        assert done.finish_reason == "length"
        assert generate(stack, "down-2", 21).usage.completion_tokens == MAX_TOKENS


# --- span files ----------------------------------------------------------------------------------


@pytest.fixture(scope="class")
def trace_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("traces")


@pytest.fixture(scope="class")
def file_stack(tmp_path_factory, trace_dir):
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        pytest.skip("OTEL_EXPORTER_OTLP_ENDPOINT is set in the test environment")
    stack = start_stack(tmp_path_factory, "file", {"PDSERVE_TRACE_DIR": str(trace_dir)})
    yield stack
    stack.stop()


class TestSpanFileStack:
    @pytest.fixture
    def stack(self, file_stack):
        return file_stack

    def test_one_trace_in_the_span_files_and_pdserve_trace_last(self, stack, trace_dir):
        generate(stack, "file-1", 1)
        spans = wait_for_trace(lambda: read_spans(span_files(trace_dir)), "file-1")
        check_trace(spans, "file-1")
        result = CliRunner().invoke(app, ["trace", "--last", "--dir", str(trace_dir)],
                                    env={"COLUMNS": "200"})  # fmt: skip
        assert result.exit_code == 0, result.output
        out = result.output
        assert "file-1" in out
        for hop in ("router@", "prefill@", "kvstore@", "decode@"):
            assert hop in out, out
        for name in ("router.request", "router.route", "kv.fetch", "decode.loop"):
            assert name in out, out

    def test_http_request_continues_the_callers_trace(self, stack, trace_dir):
        caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        body = json.dumps({"prompt": long_prompt(2), "max_tokens": MAX_TOKENS,
                           "temperature": 0, "ignore_eos": True}).encode()  # fmt: skip
        request = urllib.request.Request(
            stack.http_url + "/v1/completions", data=body, method="POST",
            headers={"Content-Type": "application/json",
                     "traceparent": f"00-{caller_trace}-{caller_span}-01"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as r:
            reply = json.loads(r.read())
        rid = reply["id"]
        spans = wait_for_trace(lambda: read_spans(span_files(trace_dir)), rid)
        [root] = [s for s in spans if s["name"] == "router.request"]
        assert root["trace_id"] == caller_trace and root["parent_span_id"] == caller_span
        assert root["attributes"][Attr.OPERATION] == "text_completion"
        assert {s["service"] for s in spans} >= SERVICES
