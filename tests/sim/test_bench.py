"""``pdserve bench``'s replay against a fake target, the CLI's error and result contracts,
and the planner's search and scaling advice (fast, no stack)."""

from __future__ import annotations

import asyncio
import json

import pytest
from typer.testing import CliRunner

from pdserve.cli import app
from pdserve.sim.plan import Outcome, Planner, PoolSignals, scaling_advice, signals_from_metrics
from pdserve.workload import result
from pdserve.workload.bench import INTERRUPTED, prompt_ids, replay
from pdserve.workload.format import Request, save

# A calibrated profile's smallest form (10 ms a step + 1 ms a token; a 1 GB/s handoff).
PROFILE = {
    "engine": {"num_kv_blocks": 256, "block_size": 16, "max_num_seqs": 8,
               "max_num_batched_tokens": 512, "kv_bytes_per_token": 1000, "num_layers": 4},
    "step_fit": {"coefficients": [0.01, 0.001, 0, 0, 0], "prefill_tokens_per_s": 1e3},
    "handoff": {"latency_s": 0.001, "bytes_per_s": 1e9},
}  # fmt: skip


class FakeTarget:
    """Streams ``max_tokens`` tokens, ``tokens_per_chunk`` at a time, ``gap_s`` apart."""

    def __init__(self, gap_s: float, tokens_per_chunk: int = 1) -> None:
        self.gap_s, self.per_chunk = gap_s, tokens_per_chunk
        self.prompts: list[list[int]] = []

    async def stream(self, prompt_ids, max_tokens):
        self.prompts.append(prompt_ids)
        sent = 0
        while sent < max_tokens:
            await asyncio.sleep(self.gap_s)
            n = min(self.per_chunk, max_tokens - sent)
            sent += n
            yield n, "local"

    async def close(self) -> None:
        pass


def test_replay_measures_ttft_gaps_and_records():
    workload = [Request(0.0, 8, 3), Request(0.02, 5, 5, "g", 4)]
    target = FakeTarget(0.01, tokens_per_chunk=2)
    records, gaps, weights = asyncio.run(replay(workload, target, seed=1))
    assert [len(p) for p in target.prompts] == [8, 5]
    assert [r.num_output_tokens for r in records] == [3, 5]
    assert all(r.error is None and r.route == "local" for r in records)
    # Request 0: chunks of 2 and 1 tokens; request 1: 2, 2, 1 -> gaps weighted by tokens.
    assert sorted(weights) == [1, 1, 2]
    assert all(0.004 <= g <= 0.2 for g in gaps)
    assert records[0].ttft_s >= 0.01 and records[0].e2e_s >= 0.02


def test_replay_interrupted_keeps_what_it_measured():
    workload = [Request(0.0, 4, 1000), Request(0.0, 4, 1), Request(60.0, 4, 1)]

    async def go():
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.2, stop.set)
        return await replay(workload, FakeTarget(0.01), stop=stop)

    records, _gaps, _weights = asyncio.run(go())
    assert [r.index for r in records] == [0, 1]  # the request not yet sent is left out
    assert records[0].error == INTERRUPTED and 0 < records[0].num_output_tokens < 1000
    assert records[1].error is None and records[1].num_output_tokens == 1


def test_prompts_share_their_group_prefix():
    a = prompt_ids(0, Request(0, 10, 1, "sys", 6), 0, 1000)
    b = prompt_ids(1, Request(0, 12, 1, "sys", 6), 0, 1000)
    assert a[:6] == b[:6] and a[6:] != b[6:8] and len(b) == 12


def test_cli_rejects_a_malformed_workload_naming_line_and_field(tmp_path):
    path = tmp_path / "w.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,12,x\n")
    out = CliRunner().invoke(app, ["sim", str(path), "--gpu", "H100", "--out", str(tmp_path / "r")])
    assert out.exit_code == 2
    assert f"error: {path}, line 2: field 'num_decode_tokens': must be a number" in out.output


def test_sim_cli_writes_the_bench_result_shape(tmp_path):
    path = tmp_path / "w.jsonl"
    save(path, [Request(0.1 * i, 200, 20) for i in range(20)])
    out = CliRunner().invoke(app, ["sim", str(path), "--gpu", "H100", "--model", "llama-3-8b",
                                   "--prefill", "1", "--decode", "1", "--out", str(tmp_path / "r.json")])  # fmt: skip
    assert out.exit_code == 0, out.output
    res = json.loads((tmp_path / "r.json").read_text())
    fake = result.build([result.RequestRecord(0, 0.0, 1, 0)], [], None, result.Slo(), "bench", {})
    assert set(res) == set(fake)
    assert set(res["requests"][0]) == set(fake["requests"][0])
    assert set(res["ttft_s"]) == {"p50", "p90", "p99"}
    assert res["num_requests"] == 20 and res["num_failed"] == 0


def test_sim_cli_caps_decode_replicas_beside_prefill_ones_as_pdserve_up_does(tmp_path):
    """With a calibrated profile (this machine's pdserve), the decode replicas of a
    disaggregated cluster get the cap ``pdserve up`` sets, colocated ones the profile's budget;
    the option overrides both."""
    from services.decode.settings import DISAGGREGATED_MAX_NUM_BATCHED_TOKENS

    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(PROFILE))
    path = tmp_path / "w.jsonl"
    save(path, [Request(0.1 * i, 200, 4) for i in range(4)])

    def decode_budget(*extra: str) -> int:
        out = CliRunner().invoke(app, ["sim", str(path), "--profile", str(profile),
                                       "--out", str(tmp_path / "r.json"), *extra])  # fmt: skip
        assert out.exit_code == 0, out.output
        return json.loads((tmp_path / "r.json").read_text())["conditions"][
            "decode_max_num_batched_tokens"]  # fmt: skip

    assert decode_budget("--prefill", "1") == DISAGGREGATED_MAX_NUM_BATCHED_TOKENS
    assert decode_budget("--prefill", "0") == PROFILE["engine"]["max_num_batched_tokens"]
    assert decode_budget("--prefill", "1", "--decode-max-num-batched-tokens", "128") == 128


def test_planner_bisects_to_the_fewest_replicas():
    calls: list[int] = []

    class P(Planner):
        def run(self, num_prefill, num_decode, workload=None):
            calls.append(num_decode)
            ok = num_decode >= 11
            return Outcome(
                num_prefill, num_decode, num_decode, 1.0, {"slo_attainment": 1.0 if ok else 0.0}
            )

    planner = P([Request(0, 1, 1)], cost=None, gpu_price_per_hour=1.0, base=None, max_replicas=32)
    best = planner.fewest(lambda k: planner.run(0, k))
    assert best.num_decode == 11
    assert calls == [1, 2, 4, 8, 16, 12, 10, 11]
    calls.clear()
    assert planner.fewest(lambda k: Outcome(0, k, k, 1.0, {"slo_attainment": 0.0})) is None


@pytest.mark.parametrize(
    ("signals", "grow"),
    [
        (PoolSignals(1, 2, 0, 0, 0.95), "decode"),
        (PoolSignals(1, 2, 0, 4, 0.5), "decode"),
        (PoolSignals(2, 2, 6, 1, 0.5), "prefill"),
        (PoolSignals(1, 1, 0, 0, 0.2), "none"),
    ],
)
def test_scaling_advice(signals, grow):
    assert scaling_advice(signals).grow == grow


def test_signals_from_the_services_metrics_pages():
    prefill = ('pdserve_queue_depth_requests{queue="prefill_waiting"} 3.0\n'
               "pdserve_kv_cache_usage_ratio 0.1\n")  # fmt: skip
    decode = ('pdserve_queue_depth_requests{queue="decode_waiting"} 1.0\n'
              'pdserve_queue_depth_requests{queue="decode_kv_fetching"} 2.0\n'
              "pdserve_kv_cache_usage_ratio 0.7\n")  # fmt: skip
    router = 'pdserve_queue_depth_requests{queue="router_admitted"} 9.0\n'
    s = signals_from_metrics([prefill, decode, decode, router])
    assert s == PoolSignals(1, 2, 3.0, 6.0, 0.7, 9.0)


def test_signals_from_pages_rendered_by_the_services_own_metrics():
    # The gauges the workers set (pdserve/metrics.py), rendered as their /metrics pages are:
    # the planner reads the real names and label values, not a copy of them.
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    from pdserve import metrics

    def page(queues: dict[str, float], kv_usage: float) -> str:
        registry = CollectorRegistry()
        depth = Gauge(metrics.QUEUE_DEPTH._name, "queue", ["queue"], registry=registry)
        usage = Gauge(metrics.KV_CACHE_USAGE._name, "kv", registry=registry)
        for queue, value in queues.items():
            depth.labels(queue).set(value)
        usage.set(kv_usage)
        return generate_latest(registry).decode()

    prefill = page({"prefill_waiting": 5}, 0.2)
    decode = page({"decode_waiting": 1, "decode_kv_fetching": 1}, 0.93)
    s = signals_from_metrics([prefill, decode])
    assert s == PoolSignals(1, 1, 5.0, 2.0, 0.93, 0.0)
    assert scaling_advice(s).grow == "decode"  # its KV pool is 93 % full


def test_plan_reads_a_live_stacks_metrics(tmp_path):
    import http.server
    import threading

    pages = {
        "/prefill": b'pdserve_queue_depth_requests{queue="prefill_waiting"} 0.0\n',
        "/decode": b'pdserve_queue_depth_requests{queue="decode_waiting"} 3.0\n'
        b"pdserve_kv_cache_usage_ratio 0.4\n",
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = pages[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        out = CliRunner().invoke(app, ["plan", "-", "--metrics", f"{base}/prefill",
                                       "--metrics", f"{base}/decode"])  # fmt: skip
    finally:
        server.shutdown()
    assert out.exit_code == 0, out.output
    assert "live: 1 prefill, 1 decode workers; grow: decode (3.0 requests waiting" in out.output


def _sse_server(gap_s: float, streaming):
    """A stand-in for the router's /v1/completions: one token per event, gap_s apart;
    ``streaming`` is set once a long request has sent a few tokens."""
    import http.server
    import threading
    import time

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for i in range(body["max_tokens"]):
                    time.sleep(gap_s)
                    if i == 5 and body["max_tokens"] > 1000:
                        streaming.set()
                    event = {"choices": [{"text": "x", "logprobs": {"tokens": ["x"]}}]}
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_bench_cli_over_http_and_ctrl_c_still_writes_the_result(tmp_path):
    import signal
    import subprocess
    import sys
    import threading
    import time

    streaming = threading.Event()
    server = _sse_server(0.02, streaming)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    workload = tmp_path / "w.jsonl"
    save(workload, [Request(0.0, 16, 4), Request(0.0, 16, 100_000), Request(600.0, 16, 1)])
    out = tmp_path / "r.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cli", "bench", str(workload), "--url", url, "--out",
         str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        assert streaming.wait(timeout=90), "the bench never sent its long request"
        time.sleep(0.5)  # the first request (4 tokens) has finished by now
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        proc.kill()
        server.shutdown()
    assert proc.returncode == 130, output
    res = json.loads(out.read_text())
    assert res["conditions"]["interrupted"] is True
    first, second = res["requests"]  # the third was never sent
    assert first["error"] is None and first["num_output_tokens"] == 4
    assert second["error"] == "interrupted" and second["num_output_tokens"] > 0
