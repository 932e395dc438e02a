"""Telemetry wired into the real services: a kvstore, a prefill and a decode worker behind real
gRPC servers in this process (the fixtures of tests/serving/conftest.py), the real model.

The test plays the router: it opens the root span, calls Prefill, then Decode with
``PrefillResponse.trace`` in ``DecodeRequest.trace``, over channels with the tracing client
interceptor. All three services share this process, hence one tracer provider and one
Prometheus registry: spans are told apart by name and parentage, not by ``service.name``.
The service fixtures and the OTLP receiver come in through tests/observability/conftest.py.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import grpc
import pytest
import structlog
from opentelemetry import context as otel_context
from prometheus_client.parser import text_string_to_metric_families

from pdserve._proto.pdserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from pdserve.grpc_tracing import traced_channel
from pdserve.port_file import FREE_PORT
from pdserve.span_file import read_spans
from pdserve.telemetry import Attr, Event, get_tracer
from tests.observability.test_telemetry import socket_closed_port
from tests.serving.conftest import BLOCK_BYTES

tracer = get_tracer("tests.observability.services")
MAX_TOKENS = 4
NUM_BLOCKS = 2  # 40-token prompts: two full 16-token blocks cross the handoff


class Stack:
    def __init__(self, kvstore, prefill, decode) -> None:
        self.kvstore, self.prefill, self.decode = kvstore, prefill, decode
        self._channels = [
            traced_channel(grpc.insecure_channel(s.address)) for s in (prefill, decode)
        ]
        self.prefill_stub = prefill_pb2_grpc.PrefillStub(self._channels[0])
        self.decode_stub = decode_pb2_grpc.DecodeStub(self._channels[1])
        self._next = 0

    def prompt(self) -> list[int]:
        """40 tokens nobody has cached yet (the first token differs every call)."""
        self._next += 1
        return [2000 + self._next, *range(300, 339)]

    def kvstore_address(self) -> str:
        return f"127.0.0.1:{self.kvstore.port}"

    def metrics_ports(self) -> dict[str, int]:
        return {
            "kvstore": self.kvstore.metrics.port,
            "prefill": self.prefill.server.metrics.port,
            "decode": self.decode.server.metrics.port,
        }

    def request(self, request_id: str, prompt: list[int] | None = None):
        """Prefill then decode, as the router drives them; (prefill response, chunks)."""
        prompt = prompt or self.prompt()
        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        p = self.prefill_stub.Prefill(
            prefill_pb2.PrefillRequest(
                request_id=request_id, prompt_token_ids=prompt, sampling=sampling
            ),
            timeout=60,
        )
        request = decode_pb2.DecodeRequest(
            request_id=request_id, prompt_token_ids=prompt, sampling=sampling,
            first_token_id=p.first_token_id, kv=p.kv, trace=p.trace,
        )  # fmt: skip
        return p, list(self.decode_stub.Decode(request, timeout=60))

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


@pytest.fixture(scope="module")
def stack(make_kvstore, make_prefill, make_decode):
    # Each binds a free metrics port of its own (read back in metrics_ports).
    kvstore = make_kvstore(http_port=FREE_PORT)
    prefill = make_prefill(f"127.0.0.1:{kvstore.port}", http_port=FREE_PORT)
    decode = make_decode(http_port=FREE_PORT)
    s = Stack(kvstore, prefill, decode)
    yield s
    s.close()


# --- reading spans back ---------------------------------------------------------------------


def _file_spans(telemetry) -> list[dict]:
    telemetry.force_flush()
    return read_spans([telemetry.span_file]) if telemetry.span_file.exists() else []


_KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def _any_value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _otlp_spans(receiver) -> list[dict]:
    """The receiver's spans in the span file's format (the fields the assertions read)."""
    out = []
    for request in list(receiver.requests):
        for rs in request.resource_spans:
            resource = {a.key: _any_value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append({
                        "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex() or None, "name": s.name,
                        "kind": _KINDS.get(s.kind, "UNSPECIFIED"),
                        "attributes": {a.key: _any_value(a.value) for a in s.attributes},
                        "events": [{"name": e.name} for e in s.events],
                        "links": [
                            {"trace_id": ln.trace_id.hex(), "span_id": ln.span_id.hex()}
                            for ln in s.links
                        ],
                        "status": {"code": {0: "UNSET", 1: "OK", 2: "ERROR"}[s.status.code]},
                        "service": resource.get("service.name"), "resource": resource,
                        "start_ns": s.start_time_unix_nano, "end_ns": s.end_time_unix_nano,
                    })  # fmt: skip
    return out


EXPECTED = {
    "router.request", "pdserve.v1.Prefill/Prefill", "prefill.request", "prefill.load_prefix",
    "prefill.queue", "prefill.compute", "prefill.batch", "prefill.handoff", "kv.put",
    "pdserve.v1.KVStore/SealShared", "pdserve.v1.KVStore/ReserveShared", "pdserve.v1.Decode/Decode", "decode.request", "decode.admission",
    "kv.fetch", "kv.get", "decode.loop",
}  # fmt: skip


def _wait_for_trace(read, trace_id: str, timeout_s: float = 10.0) -> list[dict]:
    """Server spans end just after the client got its answer: wait until all have arrived."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = [s for s in read() if s["trace_id"] == trace_id]
        names = {s["name"] for s in spans}
        ended = {"decode.request", "kv.get"} <= names and "pdserve.v1.Decode/Decode" in names
        if (names >= EXPECTED and ended) or time.monotonic() > deadline:
            return spans
        time.sleep(0.1)


def _check_one_trace(spans: list[dict], p: prefill_pb2.PrefillResponse) -> None:
    """Parent/child links and the transfer's byte counts of one disaggregated request."""
    names = {s["name"] for s in spans}
    assert names >= EXPECTED, sorted(EXPECTED - names)
    by_id = {s["span_id"]: s for s in spans}

    def parent(span: dict) -> dict:
        return by_id[span["parent_span_id"]]

    def one(name: str, kind: str | None = None, under: str | None = None) -> dict:
        found = [
            s for s in spans
            if s["name"] == name and (kind is None or s["kind"] == kind)
            and (under is None or (s["parent_span_id"] in by_id and parent(s)["name"] == under))
        ]  # fmt: skip
        assert len(found) == 1, (name, kind, under, len(found))
        return found[0]

    root = one("router.request")
    assert root["parent_span_id"] is None
    # Prefill: router -> CLIENT -> SERVER -> prefill.request -> compute -> kv.put -> Put RPC.
    p_client = one("pdserve.v1.Prefill/Prefill", "CLIENT")
    p_server = one("pdserve.v1.Prefill/Prefill", "SERVER")
    p_request = one("prefill.request")
    assert parent(p_client) is root and parent(p_server) is p_client
    assert parent(p_request) is p_server
    assert p_request["attributes"][Attr.REQUEST_ID] == "trace-1"
    assert p_request["attributes"][Attr.INPUT_TOKENS] == 40
    for name in ("prefill.load_prefix", "prefill.queue", "prefill.compute", "prefill.handoff"):
        assert parent(one(name)) is p_request, name
    compute = one("prefill.compute")
    assert compute["attributes"][Attr.PROMPT_TOKENS] == 40
    assert compute["attributes"][Attr.CACHED_TOKENS] == 0
    assert compute["attributes"][Attr.COMPUTED_TOKENS] == 40
    assert parent(one("prefill.batch")) is compute
    put = one("kv.put", under="prefill.compute")
    nbytes = NUM_BLOCKS * BLOCK_BYTES
    assert put["attributes"][Attr.KV_BYTES] == nbytes
    assert put["attributes"][Attr.KV_BLOCKS] == NUM_BLOCKS
    assert put["attributes"][Attr.KV_TRANSPORT] == "shm"
    assert put["attributes"][Attr.KV_TIER] == "dram"
    assert put["attributes"][Attr.KV_NODE] == "localhost"
    # The kvstore: SealShared CLIENT (prefill) -> SERVER -> kv.put, linked to the prefill's
    # kv.put (shared memory: the bytes went into reserved slots, the seals in one call).
    put_client = one("pdserve.v1.KVStore/SealShared", "CLIENT")
    put_server = one("pdserve.v1.KVStore/SealShared", "SERVER")
    assert parent(put_client) is put and parent(put_server) is put_client
    assert parent(one("pdserve.v1.KVStore/ReserveShared", "CLIENT")) is put  # the shm slots
    store_put = one("kv.put", under="pdserve.v1.KVStore/SealShared")
    assert store_put["attributes"][Attr.KV_BYTES] == nbytes
    assert store_put["attributes"][Attr.KV_BLOCKS] == NUM_BLOCKS
    assert put["span_id"] in {ln["span_id"] for ln in store_put["links"]}
    # Decode: router -> CLIENT -> SERVER -> decode.request -> admission / kv.fetch / loop.
    d_client = one("pdserve.v1.Decode/Decode", "CLIENT")
    d_server = one("pdserve.v1.Decode/Decode", "SERVER")
    d_request = one("decode.request")
    assert parent(d_client) is root and parent(d_server) is d_client
    assert parent(d_request) is d_server
    fetch = one("kv.fetch")
    assert parent(fetch) is d_request and parent(one("decode.admission")) is d_request
    prefill_span = format(int(p.trace.entries["traceparent"].split("-")[2], 16), "016x")
    assert prefill_span == p_request["span_id"]
    assert [ln["span_id"] for ln in fetch["links"]] == [p_request["span_id"]]
    assert fetch["attributes"][Attr.KV_BYTES] == nbytes
    assert fetch["attributes"][Attr.KV_BLOCKS] == NUM_BLOCKS
    assert fetch["attributes"][Attr.KV_TRANSPORT] == "shm"
    assert fetch["attributes"][Attr.KV_TIER] == "dram"
    # The kvstore's side of the fetch (MapShared over shared memory), under kv.fetch.
    store_get = one("kv.get")
    ancestor = parent(parent(parent(store_get)))  # kv.get <- SERVER <- CLIENT <- kv.fetch
    assert ancestor is fetch
    assert store_get["attributes"][Attr.KV_BYTES] == nbytes
    loop = one("decode.loop")
    assert parent(loop) is d_request
    assert [e["name"] for e in loop["events"]] == [Event.FIRST_TOKEN, Event.FINISH]
    assert loop["attributes"][Attr.DECODE_TOKENS] == MAX_TOKENS
    assert loop["attributes"][Attr.OUTPUT_TOKENS] == MAX_TOKENS
    assert loop["attributes"][Attr.FINISH_REASONS] == ["length"]
    assert Attr.ITL_P50_MS in loop["attributes"]
    assert d_request["attributes"][Attr.OUTPUT_TOKENS] == MAX_TOKENS
    assert all(s["status"]["code"] != "ERROR" for s in spans)


def _traced_request(stack, request_id: str):
    with tracer.start_as_current_span("router.request") as root:
        p, chunks = stack.request(request_id)
    assert [t for c in chunks for t in c.token_ids][0] == p.first_token_id
    assert chunks[0].num_kv_blocks_fetched == NUM_BLOCKS
    return format(root.get_span_context().trace_id, "032x"), p


def test_disaggregated_request_is_one_trace_in_the_span_file(setup, stack):
    t = setup("router")
    trace_id, p = _traced_request(stack, "trace-1")
    _check_one_trace(_wait_for_trace(lambda: _file_spans(t), trace_id), p)


def test_disaggregated_request_is_one_trace_over_otlp(setup, stack, otlp_receiver):
    t = setup("router", otlp_endpoint=otlp_receiver.endpoint, export_delay_ms=100)
    trace_id, p = _traced_request(stack, "trace-1")

    def read() -> list[dict]:
        t.force_flush()
        return _otlp_spans(otlp_receiver)

    _check_one_trace(_wait_for_trace(read, trace_id), p)


def test_overlapped_handoff_links_every_kv_fetch_to_the_prefill_span(setup, stack):
    """Decode starts first (following the prefill, with no PrefillResponse in hand): each
    step's kv.fetch still links to prefill.request, learnt from Prefill.Handoff, so the
    request is one trace across the handoff; usage counts only what the prefill loaded."""
    t = setup("router")
    prompt = stack.prompt()
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    out: dict = {}
    with tracer.start_as_current_span("router.request") as root:
        context = otel_context.get_current()

        def run_prefill() -> None:
            token = otel_context.attach(context)
            try:
                time.sleep(0.2)  # the decode asks first
                out["p"] = stack.prefill_stub.Prefill(
                    prefill_pb2.PrefillRequest(
                        request_id="ov-trace", prompt_token_ids=prompt, sampling=sampling
                    ),
                    timeout=60,
                )
            finally:
                otel_context.detach(token)

        thread = threading.Thread(target=run_prefill)
        thread.start()
        request = decode_pb2.DecodeRequest(
            request_id="ov-trace", prompt_token_ids=prompt, sampling=sampling,
            prefill_address=stack.prefill.address,
        )  # fmt: skip
        chunks = list(stack.decode_stub.Decode(request, timeout=60))
        thread.join(60)
    trace_id = format(root.get_span_context().trace_id, "032x")
    assert chunks[0].num_kv_blocks_fetched == NUM_BLOCKS and not chunks[0].recomputed
    assert chunks[-1].usage.cached_tokens == out["p"].num_cached_tokens == 0  # not 32
    spans = _wait_for_trace(lambda: _file_spans(t), trace_id)
    [p_request] = [s for s in spans if s["name"] == "prefill.request"]
    fetches = [s for s in spans if s["name"] == "kv.fetch"]
    assert fetches and sum(f["attributes"][Attr.KV_BLOCKS] for f in fetches) == NUM_BLOCKS
    for fetch in fetches:
        links = [(ln["trace_id"], ln["span_id"]) for ln in fetch["links"]]
        assert links == [(trace_id, p_request["span_id"])]


# --- logs -------------------------------------------------------------------------------------


def test_worker_log_lines_carry_the_request_trace(setup, stack, capsys):
    setup("decode", log_level="info", log_json=True)
    prompt = stack.prompt()
    bad_kv = common_pb2.KVSource(
        block_keys=[b"\x01" * 16, b"\x02" * 16], kvstore_address=stack.kvstore_address(),
        node_id="localhost",
    )  # fmt: skip
    request = decode_pb2.DecodeRequest(
        request_id="log-1", prompt_token_ids=prompt, first_token_id=prompt[-1], kv=bad_kv,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=2),
    )  # fmt: skip
    with tracer.start_as_current_span("router.request") as root:
        chunks = list(stack.decode_stub.Decode(request, timeout=60))
    assert chunks[0].recomputed
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    [line] = [x for x in lines if x["event"] == "decode.kv_keys_mismatch"]
    assert line["trace_id"] == format(root.get_span_context().trace_id, "032x")
    assert line["request_id"] == "log-1" and len(line["span_id"]) == 16
    assert line["service"] == "pdserve-decode"
    structlog.reset_defaults()


# --- metrics ----------------------------------------------------------------------------------


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _health(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return r.status


def test_metrics_count_the_requests_made(setup, stack):
    setup("router")
    ports = stack.metrics_ports()
    before = _scrape(ports["kvstore"])
    num_requests = 2
    for i in range(num_requests):
        stack.request(f"metrics-{i}")
    # One registry in this process: each service's endpoint serves all of it.
    after = {role: _scrape(port) for role, port in ports.items()}
    assert {role: _health(port) for role, port in ports.items()} == dict.fromkeys(ports, 200)

    def delta(name: str, role: str = "kvstore", **labels) -> float:
        return _value(after[role], name, **labels) - _value(before, name, **labels)

    blocks = NUM_BLOCKS * num_requests
    for queue in ("prefill_waiting", "decode_kv_fetching", "decode_waiting"):
        assert delta("pdserve_queue_wait_seconds_count", "prefill", queue=queue) == num_requests
    # The prefill worker and the kvstore each count the put; the decode worker and the
    # kvstore each count the get (in production these are separate processes).
    shm = {"transport": "shm", "tier": "dram"}
    assert delta("pdserve_kv_transfer_blocks_total", direction="put", **shm) == 2 * blocks
    assert delta("pdserve_kv_transfer_bytes_total", direction="put", **shm) == (
        2 * blocks * BLOCK_BYTES
    )
    assert delta("pdserve_kv_transfer_blocks_total", "decode", direction="get", **shm) == 2 * blocks
    assert delta("pdserve_kv_transfer_duration_seconds_count", direction="get", **shm) == (
        2 * num_requests
    )
    assert delta("pdserve_prefix_cache_query_tokens_total", "decode") == 2 * 40 * num_requests
    assert delta("pdserve_inter_token_latency_seconds_count", "decode") == (
        (MAX_TOKENS - 1) * num_requests  # every token after the first (sent at admission)
    )
    assert delta("pdserve_engine_step_duration_seconds_count", "prefill", phase="prefill") > 0
    assert delta("pdserve_batch_tokens_count", "prefill", phase="prefill") > 0
    assert delta("pdserve_batch_tokens_sum", "decode", phase="decode") > 0
    assert delta("pdserve_kv_fetch_fallbacks_total", "decode", reason="miss") == 0
    # Tier occupancy: the gauges follow the store (refreshed every 0.5 s).
    stats = stack.kvstore.node.store.stats().tier
    from pdserve.kv.blocks import Tier

    dram = stats(Tier.DRAM)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        now = _scrape(ports["kvstore"])
        if _value(now, "pdserve_kv_tier_blocks", tier="dram") == dram.num_blocks:
            break
        time.sleep(0.2)
    assert _value(now, "pdserve_kv_tier_blocks", tier="dram") == dram.num_blocks >= blocks
    assert _value(now, "pdserve_kv_tier_used_bytes", tier="dram") == dram.used_bytes
    assert _value(now, "pdserve_kv_tier_capacity_bytes", tier="dram") == dram.capacity_bytes


# --- telemetry failure never fails a request ---------------------------------------------------


def test_collector_down_never_fails_a_request(setup, stack):
    with socket_closed_port() as port:
        setup("router", otlp_endpoint=f"http://127.0.0.1:{port}", export_delay_ms=50)
        with tracer.start_as_current_span("router.request"):
            p, chunks = stack.request("down-1")
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert p.trace.entries["traceparent"]


def test_unwritable_span_dir_never_fails_a_request(setup, stack, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    t = setup("router", trace_dir=blocker / "traces", export_delay_ms=50)
    with tracer.start_as_current_span("router.request"):
        _, chunks = stack.request("unwritable-1")
    t.force_flush()
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert not t.span_file.exists()
