"""The Prometheus metrics module and its /metrics + /health endpoint."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from pdserve import metrics


def _get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_metric_names_carry_units_and_the_issue_list_is_complete():
    names = metrics.exposed_names()
    for name in (
        "pdserve_time_to_first_token_seconds_bucket", "pdserve_inter_token_latency_seconds_bucket",
        "pdserve_time_per_output_token_seconds_bucket", "pdserve_e2e_request_latency_seconds_bucket",
        "pdserve_requests_total", "pdserve_route_decisions_total", "pdserve_queue_depth_requests",
        "pdserve_running_batch_size_requests", "pdserve_kv_transfer_bytes_total",
        "pdserve_kv_transfer_duration_seconds_bucket", "pdserve_prefix_cache_hit_tokens_total",
        "pdserve_kv_tier_used_bytes", "pdserve_kv_evictions_total", "pdserve_redis_errors_total",
    ):  # fmt: skip
        assert name in names
    assert all(n.startswith("pdserve_") for n in names)
    ttft = metrics.TIME_TO_FIRST_TOKEN._upper_bounds
    assert ttft[0] == 0.01 and ttft[-2] == 80.0  # 10 ms .. 80 s, then +Inf
    assert metrics.INTER_TOKEN_LATENCY._upper_bounds[0] == 0.001


def test_server_serves_metrics_and_health():
    registry = CollectorRegistry()
    counter = Counter("pdserve_test_things", "things", ["kind"], registry=registry)
    counter.labels("a").inc(3)
    healthy = {"ok": True}
    server = metrics.MetricsServer(0, "127.0.0.1", health=lambda: healthy["ok"], registry=registry)
    try:
        status, ctype, body = _get(server.port, "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body)
            for s in f.samples
        }
        assert samples[("pdserve_test_things_total", (("kind", "a"),))] == 3.0
        assert _get(server.port, "/health")[::2] == (200, "ok\n")
        healthy["ok"] = False
        assert _get(server.port, "/health")[0] == 503
        healthy["ok"] = None  # falsy
        assert _get(server.port, "/health")[0] == 503
        assert _get(server.port, "/nope")[0] == 404
    finally:
        server.stop()


def test_a_broken_health_probe_reads_unhealthy():
    def probe() -> bool:
        raise RuntimeError("engine gone")

    server = metrics.MetricsServer(0, "127.0.0.1", health=probe)
    try:
        assert _get(server.port, "/health")[0] == 503
    finally:
        server.stop()


def test_port_zero_from_settings_disables_the_server():
    assert metrics.start_metrics_server(0) is None


def test_aiohttp_handler_renders_the_default_registry():
    pytest.importorskip("aiohttp")
    metrics.set_service_info(role="router", node="n1", worker_id=None)
    response = asyncio.run(metrics.aiohttp_metrics_handler(None))
    body = response.body.decode()
    assert response.content_type == "text/plain"
    assert 'pdserve_service_info{node="n1",role="router"} 1.0' in body


def test_every_metric_is_documented():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    doc = readme.split("\n## Observability", 1)[1].split("\n## ", 1)[0]
    families = metrics._pdserve_families(metrics.REGISTRY)
    suffix = {"counter": "_total", "info": "_info"}
    missing = [f.name for f in families if f"`{f.name}{suffix.get(f.type, '')}`" not in doc]
    assert len(families) >= 30 and not missing, f"undocumented: {missing}"
