"""Tracing, log correlation and their failure modes, on tiny in-process set-ups.

No collector is assumed: the OTLP test starts its own receiver built on
opentelemetry-proto's service definitions, and the interceptor tests run a real gRPC
server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent import futures

import grpc
import pytest
import structlog
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from typer.testing import CliRunner

from pdserve import grpc_tracing
from pdserve.cli import app
from pdserve.span_file import read_spans, span_files
from pdserve.telemetry import (
    Attr,
    Event,
    _LogOnceExporter,
    current_trace_id,
    extract_context,
    get_tracer,
    inject_context,
    links_from,
)

tracer = get_tracer("tests.observability")


def spans_by_name(telemetry) -> dict[str, dict]:
    assert telemetry.force_flush()
    spans = read_spans([telemetry.span_file])
    return {s["name"]: s for s in spans}


# --- the local span file --------------------------------------------------------------------


def test_span_file_has_parent_child_attributes_events_and_links(setup):
    t = setup("router", node_id="node-a", worker_id="router-1", model="smol")
    with tracer.start_as_current_span("request", attributes={Attr.REQUEST_ID: "r1"}) as root:
        with tracer.start_as_current_span("child", attributes={Attr.KV_BYTES: 4096}) as child:
            child.add_event(Event.FIRST_TOKEN, {"token": 7})
            carrier = inject_context()
        with tracer.start_as_current_span("linked", links=links_from(carrier)):
            pass
    spans = spans_by_name(t)
    r, c, linked = spans["request"], spans["child"], spans["linked"]
    trace_id = format(root.get_span_context().trace_id, "032x")
    assert {r["trace_id"], c["trace_id"], linked["trace_id"]} == {trace_id}
    assert r["parent_span_id"] is None
    assert c["parent_span_id"] == r["span_id"] == linked["parent_span_id"]
    assert c["span_id"] == format(child.get_span_context().span_id, "016x")
    assert linked["links"] == [{"trace_id": trace_id, "span_id": c["span_id"], "attributes": {}}]
    assert c["attributes"] == {Attr.KV_BYTES: 4096}
    assert [e["name"] for e in c["events"]] == [Event.FIRST_TOKEN]
    assert c["events"][0]["attributes"] == {"token": 7}
    assert r["service"] == "pdserve-router"
    assert r["resource"][Attr.NODE] == "node-a"
    assert r["resource"]["service.instance.id"] == "router-1"
    assert r["resource"]["pdserve.model"] == "smol"
    assert r["start_ns"] <= c["start_ns"] <= c["end_ns"] <= r["end_ns"]
    assert r["status"] == {"code": "UNSET", "description": None}


def test_errors_are_recorded_with_status(setup):
    t = setup("decode")
    with pytest.raises(RuntimeError), tracer.start_as_current_span("decode.loop"):
        raise RuntimeError("boom")
    span = spans_by_name(t)["decode.loop"]
    assert span["status"]["code"] == "ERROR"
    assert [e["name"] for e in span["events"]] == ["exception"]


def test_context_rides_inside_messages_across_processes(setup):
    t = setup("prefill")
    with tracer.start_as_current_span("prefill.handoff") as handoff:
        entries = inject_context()
    assert set(entries) >= {"traceparent"}
    # The far side (another process in real life) parents or links to it.
    with tracer.start_as_current_span("kv.get", context=extract_context(entries)):
        assert current_trace_id() == format(handoff.get_span_context().trace_id, "032x")
    spans = spans_by_name(t)
    assert spans["kv.get"]["parent_span_id"] == spans["prefill.handoff"]["span_id"]
    assert links_from({}, None, {"traceparent": "garbage"}) == []
    assert current_trace_id() is None


def test_sampling_ratio_zero_records_nothing_but_keeps_ids_for_logs(setup):
    t = setup("router", sampling_ratio=0.0)
    with tracer.start_as_current_span("dropped") as span:
        assert not span.is_recording()
    assert t.force_flush()
    assert read_spans(span_files(t.span_file.parent)) == []


def test_second_setup_replaces_the_first(setup, tmp_path):
    first = setup("router", trace_dir=tmp_path / "a")
    second = setup("decode", trace_dir=tmp_path / "b")
    with tracer.start_as_current_span("after"):
        pass
    assert second.force_flush()
    assert [s["service"] for s in read_spans([second.span_file])] == ["pdserve-decode"]
    assert not first.span_file.exists()


# --- OTLP export ----------------------------------------------------------------------------


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.got = threading.Event()

    def Export(self, request, context):  # noqa: N802 - gRPC naming
        self.requests.append(request)
        self.got.set()
        return trace_service_pb2.ExportTraceServiceResponse()


def start_otlp_receiver(port: int = 0) -> _Receiver:
    """An OTLP gRPC trace receiver (``port`` 0: a free one): ``.endpoint``, ``.requests``,
    ``.stop()``."""
    receiver = _Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    receiver.endpoint = f"http://127.0.0.1:{port}"
    receiver.stop = lambda: server.stop(0).wait()
    return receiver


@pytest.fixture
def otlp_receiver():
    receiver = start_otlp_receiver()
    yield receiver
    receiver.stop()


def test_otlp_export_reaches_a_grpc_receiver(setup, otlp_receiver):
    t = setup("kvstore", otlp_endpoint=otlp_receiver.endpoint, node_id="n1")
    assert t.span_file is None
    with tracer.start_as_current_span("kv.put") as parent, tracer.start_as_current_span("tier"):
        pass
    assert t.force_flush(10)
    assert otlp_receiver.got.wait(10)
    spans, services = [], set()
    for request in otlp_receiver.requests:
        for rs in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
            services.add(attrs["service.name"])
            assert attrs[Attr.NODE] == "n1"
            spans += [s for ss in rs.scope_spans for s in ss.spans]
    assert services == {"pdserve-kvstore"}
    by_name = {s.name: s for s in spans}
    assert set(by_name) == {"kv.put", "tier"}
    trace_id = parent.get_span_context().trace_id.to_bytes(16, "big")
    assert by_name["tier"].trace_id == by_name["kv.put"].trace_id == trace_id
    assert by_name["tier"].parent_span_id == by_name["kv.put"].span_id


def test_collector_down_never_fails_a_request(setup):
    with socket_closed_port() as port:
        setup("router", otlp_endpoint=f"http://127.0.0.1:{port}")
        started = time.perf_counter()
        for _ in range(50):
            with tracer.start_as_current_span("request"), tracer.start_as_current_span("inner"):
                pass
        assert time.perf_counter() - started < 0.5  # export happens off the request path


def test_failing_exporter_is_logged_once_per_outage(caplog):
    class Flaky(SpanExporter):
        results = [SpanExportResult.FAILURE, SpanExportResult.FAILURE, SpanExportResult.SUCCESS]

        def export(self, spans):
            if not self.results:
                raise ConnectionError("exporter bug")
            return self.results.pop(0)

    exporter = _LogOnceExporter(Flaky(), "collector:4317")
    with caplog.at_level(logging.INFO, logger="pdserve.telemetry"):
        outcomes = [exporter.export([]) for _ in range(5)]
    assert (
        outcomes
        == [SpanExportResult.FAILURE] * 2
        + [SpanExportResult.SUCCESS]
        + [SpanExportResult.FAILURE] * 2
    )
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(" ", 4)[-1][:7] for m in messages] == ["failing", "recover", "failing"]


def test_unwritable_span_dir_never_fails_a_request(setup, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    t = setup("prefill", trace_dir=blocker / "traces")
    with caplog.at_level(logging.WARNING, logger="pdserve.telemetry"):
        for _ in range(3):
            with tracer.start_as_current_span("request"):
                pass
            t.force_flush()
    assert not t.span_file.exists()
    warnings = [r for r in caplog.records if "span file unwritable" in r.getMessage()]
    assert len(warnings) == 1


class socket_closed_port:
    """A loopback port nothing listens on."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        pass


# --- gRPC interceptors ----------------------------------------------------------------------


def _echo_handlers(is_async: bool):
    """``/test.Echo/Say`` (unary), ``/test.Echo/Count`` (server streaming), ``/test.Echo/Fail``.

    Each answers with the trace id it sees inside the handler.
    """

    if is_async:

        async def say(request, context):
            return (current_trace_id() or "").encode()

        async def count(request, context):
            for _ in range(3):
                yield (current_trace_id() or "").encode()

        async def fail(request, context):
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such block")

    else:

        def say(request, context):
            return (current_trace_id() or "").encode()

        def count(request, context):
            for _ in range(3):
                yield (current_trace_id() or "").encode()

        def fail(request, context):
            context.abort(grpc.StatusCode.NOT_FOUND, "no such block")

    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        },
    )


def _check_rpc_spans(telemetry, trace_id: str) -> None:
    assert telemetry.force_flush()
    spans = read_spans([telemetry.span_file])
    root = next(s for s in spans if s["name"] == "client.root")
    assert {s["trace_id"] for s in spans} == {trace_id}
    for method in ("Say", "Count", "Fail"):
        name = f"test.Echo/{method}"
        client = next(s for s in spans if s["name"] == name and s["kind"] == "CLIENT")
        server = next(s for s in spans if s["name"] == name and s["kind"] == "SERVER")
        assert client["parent_span_id"] == root["span_id"]
        assert server["parent_span_id"] == client["span_id"]
        assert server["attributes"][Attr.RPC_SERVICE] == "test.Echo"
        assert server["attributes"][Attr.RPC_METHOD] == method
    fail_client = next(s for s in spans if s["name"] == "test.Echo/Fail" and s["kind"] == "CLIENT")
    assert fail_client["attributes"][Attr.RPC_STATUS] == grpc.StatusCode.NOT_FOUND.value[0]
    assert fail_client["status"]["code"] == "ERROR"
    fail_server = next(s for s in spans if s["name"] == "test.Echo/Fail" and s["kind"] == "SERVER")
    assert fail_server["attributes"][Attr.RPC_STATUS] == grpc.StatusCode.NOT_FOUND.value[0]
    assert fail_server["status"]["code"] == "UNSET"  # a client error is not the server's fault


def test_aio_interceptors_carry_one_trace_across_a_real_call(setup):
    t = setup("router")

    async def main() -> str:
        server = grpc.aio.server(interceptors=[grpc_tracing.AioServerTracingInterceptor()])
        server.add_generic_rpc_handlers((_echo_handlers(is_async=True),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", interceptors=grpc_tracing.aio_client_interceptors()
        )
        try:
            with tracer.start_as_current_span("client.root"):
                trace_id = current_trace_id()
                seen = [await channel.unary_unary("/test.Echo/Say")(b"")]
                seen += [m async for m in channel.unary_stream("/test.Echo/Count")(b"")]
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await channel.unary_unary("/test.Echo/Fail")(b"")
                assert err.value.code() is grpc.StatusCode.NOT_FOUND
            assert seen == [trace_id.encode()] * 4
            await asyncio.sleep(0.05)  # the client spans end in done-callbacks
        finally:
            await channel.close()
            await server.stop(None)
        return trace_id

    trace_id = asyncio.run(main())
    _check_rpc_spans(t, trace_id)


def test_sync_interceptors_carry_one_trace_across_a_real_call(setup):
    t = setup("kvstore")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[grpc_tracing.ServerTracingInterceptor()],
    )
    server.add_generic_rpc_handlers((_echo_handlers(is_async=False),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc_tracing.traced_channel(grpc.insecure_channel(f"127.0.0.1:{port}"))
    try:
        with tracer.start_as_current_span("client.root"):
            trace_id = current_trace_id()
            seen = [channel.unary_unary("/test.Echo/Say")(b"")]
            seen += list(channel.unary_stream("/test.Echo/Count")(b""))
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary("/test.Echo/Fail")(b"")
            assert err.value.code() is grpc.StatusCode.NOT_FOUND
        assert seen == [trace_id.encode()] * 4
    finally:
        channel.close()
        server.stop(None)
    _check_rpc_spans(t, trace_id)


def test_health_checks_are_not_traced(setup):
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    t = setup("decode")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=1),
        interceptors=[grpc_tracing.ServerTracingInterceptor()],
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc_tracing.traced_channel(grpc.insecure_channel(f"127.0.0.1:{port}"))
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    finally:
        channel.close()
        server.stop(None)
    assert t.force_flush()
    assert read_spans(span_files(t.span_file.parent)) == []


# --- logs -----------------------------------------------------------------------------------


def test_log_line_inside_a_span_carries_its_trace_and_span_id(setup, capsys):
    setup("decode", log_level="info", log_json=True)
    log = structlog.get_logger("tests")
    with tracer.start_as_current_span("decode.step") as span:
        with structlog.contextvars.bound_contextvars(request_id="req-7"):
            log.info("decode.token", prompt="a secret prompt", num_tokens=3)
        logging.getLogger("some.library").warning("from stdlib")
    log.info("outside")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    by_event = {line["event"]: line for line in lines}
    ctx = span.get_span_context()
    token = by_event["decode.token"]
    assert token["trace_id"] == format(ctx.trace_id, "032x")
    assert token["span_id"] == format(ctx.span_id, "016x")
    assert token["request_id"] == "req-7"
    assert token["service"] == "pdserve-decode"
    assert token["level"] == "info"
    assert token["timestamp"].endswith("Z")
    assert token["prompt"] == "<redacted 15 chars>"
    assert token["num_tokens"] == 3
    stdlib = by_event["from stdlib"]
    assert stdlib["trace_id"] == token["trace_id"] and stdlib["logger"] == "some.library"
    assert "trace_id" not in by_event["outside"]


def test_prompts_are_logged_only_when_enabled(setup, capsys):
    setup("router", log_level="info", log_json=True, log_prompts=True)
    structlog.get_logger("tests").info("request", prompt="hello there")
    line = json.loads(capsys.readouterr().err.splitlines()[-1])
    assert line["prompt"] == "hello there"


def test_console_renderer_and_level_filter(setup, capsys):
    setup("router", log_level="warning", log_json=False)
    log = structlog.get_logger("tests")
    log.info("hidden")
    log.warning("shown", request_id="r9")
    err = capsys.readouterr().err
    assert "hidden" not in err and "shown" in err and "r9" in err
    with pytest.raises(ValueError):
        json.loads(err.splitlines()[-1])


def test_legacy_configure_logging_still_works(capsys):
    from pdserve.logging import configure_logging

    try:
        configure_logging("info", json=True)
        structlog.get_logger("kv").info("kvstore.listening", port=1)
        line = json.loads(capsys.readouterr().err.splitlines()[-1])
        assert line["event"] == "kvstore.listening" and line["port"] == 1
    finally:
        structlog.reset_defaults()
        root = logging.getLogger()
        for handler in [h for h in root.handlers if hasattr(h, "_pdserve_handler")]:
            root.removeHandler(handler)


# --- pdserve trace --------------------------------------------------------------------------


def _two_hop_request(setup, trace_dir, request_id: str) -> str:
    """A router span and a prefill span in separate span files, like two processes."""
    setup("router", trace_dir=trace_dir, node_id="node-a")
    with tracer.start_as_current_span("router.request", attributes={Attr.REQUEST_ID: request_id}):
        trace_id = current_trace_id()
        with tracer.start_as_current_span("router.route", attributes={Attr.ROUTE: "disaggregated"}):
            entries = inject_context()
    prefill = setup("prefill", trace_dir=trace_dir, node_id="node-b")
    kv_attrs = {Attr.KV_BYTES: 1 << 20, Attr.KV_TIER: "dram", Attr.KV_TRANSPORT: "shm"}
    with (
        tracer.start_as_current_span("prefill.compute", context=extract_context(entries)),
        tracer.start_as_current_span("kv.put", attributes=kv_attrs) as put,
    ):
        put.add_event(Event.FIRST_TOKEN)
    prefill.force_flush()
    return trace_id


def test_pdserve_trace_last_renders_a_waterfall(setup, tmp_path):
    trace_dir = tmp_path / "traces"
    _two_hop_request(setup, trace_dir, "req-old")
    trace_id = _two_hop_request(setup, trace_dir, "req-new")
    runner = CliRunner()
    result = runner.invoke(
        app, ["trace", "--last", "--dir", str(trace_dir)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert trace_id in out and "req-new" in out
    for text in ("router@node-a", "prefill@node-b", "router.request", "kv.put", "1.0 MiB",
                 "dram/shm", Event.FIRST_TOKEN):  # fmt: skip
        assert text in out
    rows = [line for line in out.splitlines() if "router.request" in line or "kv.put" in line]
    assert rows[0].index("router.request") < rows[1].index("kv.put")  # kv.put is nested deeper

    by_id = runner.invoke(
        app, ["trace", "req-old", "--dir", str(trace_dir)], env={"COLUMNS": "200"}
    )
    assert by_id.exit_code == 0 and "req-old" in by_id.output and trace_id not in by_id.output
    missing = runner.invoke(app, ["trace", "nope", "--dir", str(trace_dir)])
    assert missing.exit_code == 1 and "no trace for request 'nope'" in missing.output
    empty = runner.invoke(app, ["trace", "--last", "--dir", str(tmp_path / "none")])
    assert empty.exit_code == 1


# --- helpers for the services ---------------------------------------------------------------


def test_request_span_tags_the_span_and_the_logs(setup, capsys):
    from pdserve.telemetry import request_span

    t = setup("router", log_level="info", log_json=True)
    with request_span("router.request", "req-42", **{Attr.MAX_TOKENS: 64}) as span:
        structlog.get_logger("tests").info("router.admitted")
    structlog.get_logger("tests").info("after")
    spans = spans_by_name(t)
    assert spans["router.request"]["attributes"] == {Attr.REQUEST_ID: "req-42", Attr.MAX_TOKENS: 64}
    lines = {json.loads(x)["event"]: json.loads(x) for x in capsys.readouterr().err.splitlines()}
    assert lines["router.admitted"]["request_id"] == "req-42"
    assert lines["router.admitted"]["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert "request_id" not in lines["after"]


def test_itl_attributes_summarise_the_decode_loop():
    from pdserve.telemetry import itl_attributes

    times = [0.0, 0.010, 0.030, 0.040, 0.140]  # gaps 10, 20, 10, 100 ms
    assert itl_attributes(times) == {
        Attr.DECODE_TOKENS: 5,
        Attr.ITL_MEAN_MS: 35.0,
        Attr.ITL_P50_MS: 20.0,
        Attr.ITL_P99_MS: 100.0,
        Attr.ITL_MAX_MS: 100.0,
    }
    assert itl_attributes([1.0]) == {Attr.DECODE_TOKENS: 1}
