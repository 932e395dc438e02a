"""The router process logic against fake prefill/decode workers (real gRPC, real Redis).

The fakes are tiny grpc.aio servicers registered in the Redis worker registry, so these tests
exercise routing, retries, failure handling, admission and both HTTP and gRPC edges without
running a model.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid

import grpc
import pytest

from pdserve._proto.pdserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from pdserve.client import (
    Client,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from pdserve.engine.block_hash import chain_block_keys, root_key
from pdserve.kv.blocks import Tier
from pdserve.kv.metadata import (
    KVEventPublisher,
    LocationEvent,
    RedisLayout,
    WorkerInfo,
    WorkerRegistry,
    connect,
)
from pdserve.port_file import FREE_PORT
from services.router.server import RouterServer
from services.router.settings import RouterSettings


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


PREFILL_TRACE = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


class FakePrefill(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.requests: list[prefill_pb2.PrefillRequest] = []
        self.fail = False

    async def Prefill(self, request, context):
        self.requests.append(request)
        if self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill crashed")
        kv = common_pb2.KVSource(block_keys=[b"k" * 16], kvstore_address="127.0.0.1:1", node_id="n")
        n = len(request.prompt_token_ids)
        return prefill_pb2.PrefillResponse(
            first_token_id=7, kv=kv, num_cached_tokens=16, num_computed_tokens=n - 16,
            worker_id=self.worker_id, trace=common_pb2.TraceContext(entries=PREFILL_TRACE),
        )  # fmt: skip


class FakeDecode(decode_pb2_grpc.DecodeServicer):
    """Streams max_tokens tokens "t0 t1 ..." from position len(resume_token_ids) on;
    ``mode``: ok | die (after 2 chunks of this call) | hang (after 1)."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.requests: list[decode_pb2.DecodeRequest] = []
        self.mode = "ok"

    async def Decode(self, request, context):
        self.requests.append(request)
        n, start = request.sampling.max_tokens, len(request.resume_token_ids)
        for i in range(start, n):
            if self.mode == "die" and i - start == 2:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker crashed")
            if self.mode == "hang" and i - start == 1:
                await asyncio.sleep(3600)
            if self.mode == "slow" and i == start:
                await asyncio.sleep(2.0)
            tid = (
                request.first_token_id if i == 0 and request.HasField("first_token_id") else 100 + i
            )
            chunk = decode_pb2.DecodeChunk(token_ids=[tid], text=f"t{i} ")
            if i == n - 1:
                chunk.finish_reason = common_pb2.FINISH_REASON_LENGTH
                chunk.usage.CopyFrom(common_pb2.Usage(
                    prompt_tokens=len(request.prompt_token_ids), completion_tokens=n - start,
                    cached_tokens=32))  # fmt: skip
            yield chunk
            await asyncio.sleep(0.001)


@pytest.fixture(scope="module")
def env(redis_server):
    cluster = f"rt{uuid.uuid4().hex[:8]}"
    loop = LoopThread()
    registry = WorkerRegistry(connect(redis_server.url), RedisLayout(cluster), ttl_s=60)
    fakes: dict[str, object] = {}
    infos: list[WorkerInfo] = []
    servers = []

    async def start_fake(servicer, adder, role):
        server = grpc.aio.server()
        adder(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        info = WorkerInfo(servicer.worker_id, role, f"127.0.0.1:{port}", "nodeA")
        registry.heartbeat(info)
        infos.append(info)
        fakes[servicer.worker_id] = servicer

    for wid in ("p0", "p1"):
        loop.run(
            start_fake(FakePrefill(wid), prefill_pb2_grpc.add_PrefillServicer_to_server, "prefill")
        )
    for wid in ("d0", "d1"):
        loop.run(
            start_fake(FakeDecode(wid), decode_pb2_grpc.add_DecodeServicer_to_server, "decode")
        )
    settings = RouterSettings(
        redis_url=redis_server.url, cluster_name=cluster, grpc_host="127.0.0.1", grpc_port=0,
        http_host="127.0.0.1", http_port=FREE_PORT, disagg_threshold_tokens=64,
        disaggregation_policy="threshold",
        decode_stall_timeout_s=1.0, heartbeat_ttl_s=3.0, heartbeat_interval_s=1.0,
        registry_refresh_s=0.1,
    )  # fmt: skip
    router = RouterServer(settings)
    loop.run(router.start())
    yield type("Env", (), dict(router=router, fakes=fakes, loop=loop, settings=settings,
                               registry=registry, infos=infos,
                               grpc=f"127.0.0.1:{router.grpc_port}",
                               http=f"http://127.0.0.1:{router.http_port}"))  # fmt: skip
    loop.run(router.stop())
    for server in servers:
        loop.run(server.stop(0))
    loop.close()


@pytest.fixture(autouse=True)
def reset(env):
    for fake in env.fakes.values():
        fake.requests.clear()
        if hasattr(fake, "mode"):
            fake.mode = "ok"
        if hasattr(fake, "fail"):
            fake.fail = False
    env.router.router._down_until.clear()
    env.router.router.affinity = type(env.router.router.affinity)(1000)


def post(env, path: str, body, headers=None) -> tuple[int, dict, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(env.http + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read().decode()
            status, hdrs = resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw, status, hdrs = exc.read().decode(), exc.code, dict(exc.headers)
    try:
        return status, hdrs, json.loads(raw)
    except json.JSONDecodeError:
        return status, hdrs, raw


LONG = " ".join(["word"] * 200)


def test_short_prompt_prefills_locally_long_prompt_disaggregates(env):
    with Client(env.grpc) as client:
        short = client.generate("Hi", max_tokens=3)
        long = client.generate(LONG, max_tokens=3)
    assert short.text == "t0 t1 t2 " and short.finish_reason == "length"
    assert not short.route.disaggregated and short.route.prefill_worker == ""
    assert (
        short.route.reason.startswith("uncached suffix ") and "< threshold 64" in short.route.reason
    )
    assert long.route.disaggregated and long.route.prefill_worker in ("p0", "p1")
    assert long.token_ids[0] == 7  # the prefill worker's first token rides to decode
    decode_req = env.fakes[long.route.decode_worker].requests[-1]
    assert decode_req.first_token_id == 7 and decode_req.kv.block_keys == [b"k" * 16]
    # usage.cached_tokens is what the prefill loaded instead of computing
    assert long.usage.cached_tokens == 16
    assert long.route.uncached_tokens == long.route.prompt_tokens - 16


def test_repeated_prefix_goes_to_the_same_decode_worker(env):
    with Client(env.grpc) as client:
        first = client.generate(LONG, max_tokens=2)
        again = [client.generate(LONG + f" tail{i}", max_tokens=2) for i in range(3)]
    assert {c.route.decode_worker for c in again} == {first.route.decode_worker}
    # the decode worker now holds the prefix: the suffix is short, so no remote prefill
    assert not any(c.route.disaggregated for c in again)
    assert "decode worker holds" in again[0].route.reason


def test_failed_prefill_is_retried_on_another_worker(env):
    env.fakes["p0"].fail = True
    env.fakes["p1"].fail = False
    with Client(env.grpc) as client:
        done = [client.generate(f"x{i} " + LONG, max_tokens=2) for i in range(2)]
    assert all(d.route.prefill_worker == "p1" for d in done)
    retried = [d for d in done if d.route.prefill_attempts == 2]
    assert retried and "prefill on p0 failed (unavailable)" in retried[0].route.reason


def test_all_prefill_workers_failing_falls_back_to_local_prefill(env):
    env.fakes["p0"].fail = env.fakes["p1"].fail = True
    with Client(env.grpc) as client:
        done = client.generate(LONG + " fallback", max_tokens=2)
    assert not done.route.disaggregated and done.route.prefill_attempts == 2
    assert done.text == "t0 t1 "


def test_decode_death_mid_stream_migrates_over_grpc_and_http(env):
    env.fakes["d0"].mode = "die"
    with Client(env.grpc, max_retries=0) as client:
        done = client.generate("Hi there", max_tokens=5)
    assert done.text == "t0 t1 t2 t3 t4 " and done.token_ids == [100, 101, 102, 103, 104]
    assert done.usage.completion_tokens == 5
    if done.route.decode_worker == "d0":  # it was routed to the dying worker: it moved
        assert list(env.fakes["d1"].requests[-1].resume_token_ids) == [100, 101]
    env.fakes["d1"].mode, env.fakes["d0"].mode = "die", "ok"
    env.router.router._down_until.clear()
    status, _, raw = post(env, "/v1/completions", {"prompt": "Hi", "max_tokens": 5, "stream": True})
    events = [json.loads(e[6:]) for e in raw.splitlines() if e.startswith("data: {")]
    assert status == 200 and "".join(e["choices"][0]["text"] for e in events) == "t0 t1 t2 t3 t4 "


def test_decode_death_everywhere_is_a_clear_error_and_next_requests_succeed(env):
    env.fakes["d0"].mode = env.fakes["d1"].mode = "die"
    with Client(env.grpc, max_retries=0) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable, match=r"decode worker d\d failed \(unavailable\) after 4 "
                           "tokens: .*no other decode worker to continue on"):  # fmt: skip
            client.generate("Hi there", max_tokens=9)
        assert time.monotonic() - started < 5
        env.fakes["d0"].mode = env.fakes["d1"].mode = "ok"
        env.router.router._down_until.clear()
        assert client.generate("Hi there", max_tokens=2).text == "t0 t1 "


def test_stalled_decode_streams_move_until_the_migration_limit(env):
    env.fakes["d0"].mode = env.fakes["d1"].mode = "hang"
    with Client(env.grpc, max_retries=0) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="failed \\(stall\\) after 4 tokens: .*sent nothing "
                           "for 1.0s; migration limit 3 reached"):  # fmt: skip
            client.generate("Hello", max_tokens=9)
    assert time.monotonic() - started < 8
    assert len(env.router.router._alive("decode")) == 2  # slow is not dead


def test_admission_rejects_when_predicted_ttft_exceeds_deadline(env):
    env.router.router.prefill_tokens_per_s = 2000.0  # the fakes "prefill" absurdly fast
    with (
        Client(env.grpc, max_retries=0) as client,
        pytest.raises(ResourceExhausted, match="exceeds the deadline") as info,
    ):
        client.generate(LONG * 10, max_tokens=2, timeout_s=0.2)
    assert info.value.retry_after_s >= 1
    status, headers, body = post(env, "/v1/completions", {"prompt": LONG * 10, "max_tokens": 2},
                                 {"x-pdserve-deadline-s": "0.2"})  # fmt: skip
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert body["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": ""}, "prompt must not be empty"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens must be >= 1"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "model": "gpt-9"}, "model 'gpt-9' is not served here"),
        ({"prompt": "x " * 9000}, "exceeds the model's context"),
        ({"max_tokens": 3}, "prompt"),
        (b"{not json", "not valid JSON"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_completions_input_is_400(env, body, message):
    status, _, reply = post(env, "/v1/completions", body)
    assert status == 400, reply
    assert message in reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error"


def test_bad_chat_input_is_400_and_grpc_invalid_argument(env):
    status, _, reply = post(env, "/v1/chat/completions", {"messages": []})
    assert status == 400 and "messages" in reply["error"]["message"]
    status, _, reply = post(env, "/v1/chat/completions",
                            {"messages": [{"role": "wizard", "content": "x"}]})  # fmt: skip
    assert status == 400
    with Client(env.grpc) as client:
        with pytest.raises(InvalidArgument, match="temperature must be"):
            client.generate("x", temperature=-1.0)
        with pytest.raises(InvalidArgument, match="prompt token ids must be in"):
            client.generate([10**9])
        assert client.generate("still fine", max_tokens=1).text == "t0 "


def test_openai_http_shapes(env):
    status, headers, body = post(env, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 200 and body["object"] == "text_completion"
    assert (
        body["choices"][0]["text"] == "t0 t1 " and body["choices"][0]["finish_reason"] == "length"
    )
    assert body["usage"]["completion_tokens"] == 2
    route = json.loads(headers["x-pdserve-route"])
    assert route == body["pdserve_route"] and route["decode_worker"] in ("d0", "d1")
    status, headers, raw = post(env, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}})  # fmt: skip
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["pdserve_route"]["decode_worker"] in ("d0", "d1")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "t0 t1 t2 "
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_streaming_error_after_first_token_is_reported_in_band(env):
    env.fakes["d0"].mode = env.fakes["d1"].mode = "die"
    status, _, raw = post(env, "/v1/completions", {"prompt": "Hi", "max_tokens": 5, "stream": True})
    assert status == 200
    events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "failed (unavailable) after 4 tokens" in json.loads(events[-2])["error"]["message"]


def test_official_openai_package(env):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=env.http + "/v1", api_key="unused", max_retries=0)
    done = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2)
    assert done.choices[0].text == "t0 t1 " and done.usage.completion_tokens == 2
    chat = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert chat.choices[0].message.content == "t0 t1 "
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3, stream=True,
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "t0 t1 t2 "
    assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct"]
    with pytest.raises(openai.BadRequestError, match="not served here"):
        client.completions.create(model="nope", prompt="Hi", max_tokens=2)


def test_bearer_token_is_required_when_api_key_is_set(env):
    settings = env.settings.model_copy(update={"api_key": "s3cret", "http_port": FREE_PORT})
    server = RouterServer(settings)
    env.loop.run(server.start())
    try:
        target = f"127.0.0.1:{server.grpc_port}"
        with Client(target) as anonymous, pytest.raises(Unauthenticated, match="bearer"):
            anonymous.generate("Hi", max_tokens=1)
        with Client(target, token="s3cret") as client:
            assert client.generate("Hi", max_tokens=1).text == "t0 "
        req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v1/models")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.code == 401
        req.add_header("Authorization", "Bearer s3cret")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
    finally:
        env.loop.run(server.stop())


# --- telemetry ---------------------------------------------------------------------------------


@pytest.fixture
def spans(tmp_path):
    """Router spans of this test, read back from a span file."""
    from pdserve import telemetry
    from pdserve.span_file import read_spans

    t = telemetry.setup_telemetry(
        "router", trace_dir=tmp_path, otlp_endpoint="", log_level=None, export_delay_ms=50
    )

    def read() -> dict[str, list[dict]]:
        t.force_flush()
        out: dict[str, list[dict]] = {}
        for span in read_spans([t.span_file]) if t.span_file.exists() else []:
            out.setdefault(span["name"], []).append(span)
        return out

    yield read
    t.shutdown()


def scrape(env) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(env.http + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def delta(before, after, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_disaggregated_request_spans_metrics_and_the_prefill_trace_passed_to_decode(env, spans):
    before = scrape(env)
    with Client(env.grpc) as client:
        done = client.generate(LONG, max_tokens=3, request_id="tel-1")
    assert done.route.disaggregated
    [decoded] = [r for f in env.fakes.values() if hasattr(f, "mode") for r in f.requests]
    assert dict(decoded.trace.entries) == PREFILL_TRACE  # the decode links its fetch to it
    after = scrape(env)
    d = {"route": "disaggregated"}
    assert delta(before, after, "pdserve_requests_total", finish_reason="length", **d) == 1
    assert delta(before, after, "pdserve_route_decisions_total",
                 reason="uncached_above_threshold", **d) == 1  # fmt: skip
    assert delta(before, after, "pdserve_time_to_first_token_seconds_count", **d) == 1
    assert delta(before, after, "pdserve_generation_tokens_total") == 3
    by_name = spans()
    [root] = by_name["router.request"]
    assert root["parent_span_id"] is None and root["kind"] == "SERVER"
    a = root["attributes"]
    assert a["pdserve.request.id"] == "tel-1" and a["pdserve.route.decision"] == "disaggregated"
    assert a["gen_ai.request.max_tokens"] == 3 and a["gen_ai.usage.output_tokens"] == 3
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert [e["name"] for e in root["events"]] == ["gen_ai.first_token", "pdserve.finish"]
    [route] = by_name["router.route"]
    scores = json.loads(route["attributes"]["pdserve.route.scores"])
    assert set(scores["decode"]) == {"d0", "d1"} and set(scores["prefill"]) == {"p0", "p1"}
    assert route["attributes"]["pdserve.route.prefill_worker"] in scores["prefill"]
    for name in ("router.route", "router.admission", "pdserve.v1.Prefill/Prefill",
                 "pdserve.v1.Decode/Decode"):  # fmt: skip
        [span] = by_name[name]
        assert span["parent_span_id"] == root["span_id"], name
    assert "pdserve.v1.Router/Generate" not in by_name  # router.request is the server span


def test_failures_are_error_spans_and_counted(env, spans):
    before = scrape(env)
    env.fakes["d0"].mode = env.fakes["d1"].mode = "die"
    with Client(env.grpc, max_retries=0) as client, pytest.raises(Unavailable):
        client.generate("Hi there", max_tokens=5, request_id="tel-die")
    env.router.router._down_until.clear()  # both workers "died": bring them back
    env.router.router.prefill_tokens_per_s = 2000.0
    with Client(env.grpc, max_retries=0) as client, pytest.raises(ResourceExhausted):
        client.generate(LONG * 10, max_tokens=2, timeout_s=0.2)
    after = scrape(env)
    assert delta(before, after, "pdserve_requests_total", finish_reason="error", route="local") == 1
    assert delta(before, after, "pdserve_rejected_requests_total", reason="deadline") == 1
    by_name = spans()
    died = next(
        s for s in by_name["router.request"] if s["attributes"]["pdserve.request.id"] == "tel-die"
    )
    assert died["status"]["code"] == "ERROR" and "UNAVAILABLE" in died["status"]["description"]
    assert died["attributes"]["error.type"] == "worker_failed"
    assert died["attributes"]["gen_ai.response.finish_reasons"] == ["error"]
    assert died["attributes"]["gen_ai.usage.output_tokens"] == 4  # 2 on each worker
    assert [e["name"] for e in died["events"]].count("pdserve.migration") == 1
    [rejected] = [s for s in by_name["router.admission"] if s["status"]["code"] == "ERROR"]
    assert rejected["attributes"]["pdserve.admission.reason"] == "deadline"


# --- every bad input is a 4xx -----------------------------------------------------------------

DEEP = b'{"prompt": "x", "stop": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"prompt": "x", "max_tokens": 2**31}, "max_tokens", "less than or equal to 2147483647"),
        ({"prompt": "x", "max_tokens": -(2**63)}, "max_tokens", "greater than or equal"),
        ({"prompt": "x", "seed": 2**63}, "seed", "less than or equal"),
        ({"prompt": "x", "top_k": 2**40}, "top_k", "less than or equal"),
        ({"prompt": [2**31]}, None, "prompt"),
        ({"prompt": "x", "logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"prompt": "x", "stop": ["a"] * 17}, "stop", "at most 16"),
        ({"prompt": "x", "temperature": -1.0}, "temperature", "temperature must be"),
        (b'{"prompt": "x", "temperature": 1e999}', "temperature", "finite"),
        ({"prompt": "x", "temperature": 3.5e38}, "temperature", "less than or equal to 3402823466"),
        ({"prompt": "x", "repetition_penalty": -1e39}, "repetition_penalty", "greater than"),
        ({"prompt": "x", "top_p": 1e-311}, "top_p", "top_p must be in (0, 1], got 0.0"),
        (b'{"prompt": "x", "top_p": NaN}', None, "numbers must be finite"),
        (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", None, "more than 40 digits"),
        (DEEP, None, "nested deeper than 32 levels"),
        (b'{"prompt": "\\ud800 lone"}', None, "not valid Unicode"),
        (b'{"prompt": "\xff\xfe"}', None, "not valid UTF-8"),
        ({"prompt": "x", "model": "m" * 10_000}, "model", "at most 256 characters"),
        ({"prompt": "x", "logit_bias": {"11": 5}}, "logit_bias", "logit_bias is not supported"),
        ({"prompt": "x", "suffix": "!"}, "suffix", "suffix is not supported"),
        ({"prompt": "x", "best_of": 3}, "best_of", "best_of is not supported"),
        ({"prompt": "x", "n": 2**40}, "n", "less than or equal"),
        ({"prompt": "x", "user": "u" * 300}, "user", "at most 256 characters"),
    ],
)
def test_bad_completions_fields_are_400_naming_the_field(env, body, param, message):
    status, _, reply = post(env, "/v1/completions", body)
    assert status == 400, reply
    assert message in reply["error"]["message"] and len(reply["error"]["message"]) < 300
    if param is not None:
        assert reply["error"]["param"] == param


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"5": 1}}, "logit_bias"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_unimplemented_openai_chat_fields_are_refused(env, extra, param):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}
    status, _, reply = post(env, "/v1/chat/completions", body)
    assert status == 400 and reply["error"]["param"] == param
    assert f"{param} is not supported" in reply["error"]["message"]
    harmless = {"messages": body["messages"], "max_tokens": 2,
                "response_format": {"type": "text"}, "tools": []}  # fmt: skip
    assert post(env, "/v1/chat/completions", harmless)[0] == 200


def test_an_oversized_body_is_413(env):
    status, _, reply = post(env, "/v1/completions", {"prompt": "x" * (5 << 20)})
    assert status == 413 and reply["error"]["type"] == "invalid_request_error"


def test_bad_grpc_fields_are_invalid_argument_without_echoing_them(env):
    cases = [
        (dict(model="m" * 10_000), "is not served here"),
        (dict(request_id="r" * 10_000), "request_id is 10000 characters"),
        (dict(cache_salt="s" * 10_000), "cache_salt is 10000 characters"),
        (dict(seed=-5), "seed must be"),
        (dict(max_tokens=2**31 - 1), "exceeds the model's context"),
        (dict(stop=["x" * 1000]), "stop takes at most 16 strings"),
        (dict(stop_token_ids=[10**9]), "stop_token_ids takes at most"),
    ]
    with Client(env.grpc, max_retries=0) as client:
        for kwargs, message in cases:
            with pytest.raises(InvalidArgument, match=message) as info:
                client.generate("Hi", **kwargs)
            assert len(str(info.value)) < 400, kwargs
        with pytest.raises(InvalidArgument, match=r"messages\[0\].role must be one of"):
            client.generate(messages=[{"role": "wizard", "content": "x"}])
        assert client.generate("still fine", max_tokens=1).text == "t0 "


def test_logprobs_reach_both_apis(env):
    status, _, body = post(env, "/v1/completions", {"prompt": "Hi", "max_tokens": 2,
                                                    "logprobs": 2})  # fmt: skip
    assert status == 200
    assert env.fakes[body["pdserve_route"]["decode_worker"]].requests[-1].sampling.logprobs == 2
    status, _, body = post(env, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "logprobs": True,
        "top_logprobs": 3})  # fmt: skip
    assert status == 200
    assert env.fakes[body["pdserve_route"]["decode_worker"]].requests[-1].sampling.logprobs == 3


# --- replicas, liveness and readiness -----------------------------------------------------------


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_two_router_replicas_share_workers_and_cache_locations(env):

    second = RouterServer(env.settings.model_copy(update={"http_port": FREE_PORT}))
    env.loop.run(second.start())
    try:
        prompt = LONG + " replicas"
        ids = env.router.model.tokenizer.encode(prompt)
        root = root_key(env.router.model.fingerprint, None)
        keys = chain_block_keys(ids, env.settings.block_size, root)  # as both routers do
        client = connect(env.settings.redis_url)
        publisher = KVEventPublisher(client, RedisLayout(env.settings.cluster_name), "d1",
                                     lambda: (0, {}))  # fmt: skip
        publisher.start()
        for seq, key in enumerate(keys, start=1):  # d1's own cache holds the whole prompt
            publisher.enqueue(LocationEvent(seq, "stored", key, Tier.HBM, None))
        assert publisher.flush()
        deadline = time.monotonic() + 10
        routes = []
        for server in (env.router, second):
            while not server.directory.prefixes(keys) and time.monotonic() < deadline:
                time.sleep(0.05)
            with Client(f"127.0.0.1:{server.grpc_port}") as c:
                routes.append(c.generate(prompt, max_tokens=2).route)
        assert [r.decode_worker for r in routes] == ["d1", "d1"]
        assert all("decode worker holds" in r.reason for r in routes)
        assert _get(f"http://127.0.0.1:{second.http_port}/ready")[0] == 200
        publisher.stop()
    finally:
        env.loop.run(second.stop())


def test_two_router_replicas_share_one_admission_limit_through_their_heartbeats(env):
    """A stream admitted by the first replica counts against the second's limit (here 1)."""
    second = RouterServer(env.settings.model_copy(
        update={"http_port": FREE_PORT, "max_inflight_requests": 1}))  # fmt: skip
    env.loop.run(second.start())
    env.fakes["d0"].mode = env.fakes["d1"].mode = "hang"
    try:
        with grpc.insecure_channel(env.grpc) as channel:
            held = router_pb2_grpc.RouterStub(channel).Generate(
                router_pb2.GenerateRequest(prompt="Hold", sampling=common_pb2.SamplingParams(
                    max_tokens=8)), timeout=30)  # fmt: skip
            next(held)  # admitted by the first replica, and left open
            deadline = time.monotonic() + 10
            while second.router._peer_inflight() < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            with (
                Client(f"127.0.0.1:{second.grpc_port}", max_retries=0) as client,
                pytest.raises(ResourceExhausted, match=r"\(1/1 requests\)"),
            ):
                client.generate("Hi", max_tokens=2)
            held.cancel()
    finally:
        env.loop.run(second.stop())


def test_a_slow_non_streaming_response_sends_headers_and_whitespace_while_it_waits(
    env, monkeypatch
):
    """Past the keep-alive period the 200 headers go out, then spaces, then the JSON body
    (valid JSON as a whole); a response ready sooner is sent whole, route header included."""
    from services.router import openai_api

    monkeypatch.setattr(openai_api, "SSE_KEEPALIVE_S", 0.3)
    env.fakes["d0"].mode = env.fakes["d1"].mode = "slow"  # 2 s before the first token
    host, port = env.http.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    started = time.monotonic()
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 2}),
                 {"Content-Type": "application/json"})  # fmt: skip
    resp = conn.getresponse()
    headers_s = time.monotonic() - started
    first = resp.read(1)
    raw = first + resp.read()
    conn.close()
    assert resp.status == 200 and headers_s < 1.5 and first == b" "
    assert time.monotonic() - started >= 2.0
    assert raw.startswith(b"  ")  # a space every 0.3 s during the 2 s wait
    assert json.loads(raw)["choices"][0]["text"] == "t0 t1 "
    env.fakes["d0"].mode = env.fakes["d1"].mode = "ok"
    status, headers, body = post(env, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 200 and "x-pdserve-route" in {k.lower() for k in headers}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_client_that_leaves_while_its_request_waits_frees_it_at_the_next_keep_alive(
    env, monkeypatch, stream
):
    """aiohttp does not cancel a handler whose client left: the keep-alive write that finds
    the connection gone does, so the request ends (and its decode call is aborted) before its
    first token comes 2 s later."""
    from services.router import openai_api

    monkeypatch.setattr(openai_api, "SSE_KEEPALIVE_S", 0.2)
    env.fakes["d0"].mode = env.fakes["d1"].mode = "slow"  # 2 s before the first token
    host, port = env.http.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "Leaving", "max_tokens": 2, "stream": stream}).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
    assert sock.recv(64).startswith(b"HTTP/1.1 200")  # admitted: the headers came
    sock.close()
    started = time.monotonic()
    while env.router.router.num_inflight and time.monotonic() - started < 1.5:
        time.sleep(0.05)
    assert env.router.router.num_inflight == 0, "still waiting for a client that left"


def test_a_router_without_decode_workers_is_alive_but_not_ready(env):
    empty = env.settings.model_copy(update={"http_port": FREE_PORT,
                                            "cluster_name": f"empty{uuid.uuid4().hex[:6]}"})  # fmt: skip
    server = RouterServer(empty)
    env.loop.run(server.start())
    try:
        base = f"http://127.0.0.1:{server.http_port}"
        status, body = _get(base + "/ready")
        assert status == 503 and body["decode_workers"] == 0
        assert _get(base + "/live") == (200, {"status": "alive"})
    finally:
        env.loop.run(server.stop())


def test_an_emptied_registry_is_not_read_as_no_workers(env):
    """A Redis restart loses every worker key until the next heartbeats: the router keeps its
    last known workers for a heartbeat TTL meanwhile, and serves."""
    connect(env.settings.redis_url).flushall()
    time.sleep(3 * env.settings.registry_refresh_s)
    with Client(env.grpc, max_retries=0) as client:
        assert client.generate("Hi", max_tokens=2).text == "t0 t1 "
    assert _get(env.http + "/ready")[0] == 200
    for info in env.infos:  # the heartbeats arrive again
        env.registry.heartbeat(info)


def test_an_admitted_grpc_stream_gets_its_headers_before_the_first_token(env):
    env.fakes["d0"].mode = env.fakes["d1"].mode = "slow"
    with grpc.insecure_channel(env.grpc) as channel:
        call = router_pb2_grpc.RouterStub(channel).Generate(
            router_pb2.GenerateRequest(prompt="Hi", sampling=common_pb2.SamplingParams(
                max_tokens=2)), timeout=30)  # fmt: skip
        started = time.monotonic()
        call.initial_metadata()
        headers_s = time.monotonic() - started
        chunks = list(call)
    assert headers_s < 1.5 and time.monotonic() - started >= 2.0
    assert "".join(c.text for c in chunks) == "t0 t1 "
