"""The console's HTTP routes on the router's aiohttp app, with the router and the registry
replaced by plain stand-ins: the page and assets, the key check, and the request view that
merges the router's spans in memory with the other hops' from this run's span files."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from pdserve.errors import Unauthenticated
from pdserve.kv.metadata import WorkerInfo
from services.router.console import CSP, Console, jaeger_ui_url
from services.router.console_data import RecentSpans
from services.router.openai_api import make_app
from services.router.settings import RouterSettings
from tests.console.test_console_data import MS, record_request, span_line

KEY = "k-123"


class Registry:
    def workers(self) -> list[WorkerInfo]:
        now_ms = int(time.time() * 1000)
        return [WorkerInfo("decode-1", "decode", "h:1", "n1", {"num_blocks": 8},
                           {"running": 1, "num_free_blocks": 6}, now_ms, now_ms)]  # fmt: skip


def check_key(header: str | None) -> None:
    if header != f"Bearer {KEY}":
        raise Unauthenticated("missing or invalid API key")


def make_console(tmp_path, spans: RecentSpans, *, key: bool = True) -> Console:
    settings = RouterSettings(
        trace_dir=tmp_path,
        otlp_endpoint="",
        disagg_threshold_tokens=32,
        disaggregation_policy="threshold",
        console_jaeger_url="http://jaeger.example:16686",
    )
    router = SimpleNamespace(
        settings=settings, num_inflight=0, directory=SimpleNamespace(redis_ok=True),
        model=SimpleNamespace(name="tiny", tokenizer=None),
        stats=lambda: {"num_inflight": 0, "prefill_workers": 0, "decode_workers": 1},
    )  # fmt: skip
    return Console(
        router, Registry(), spans, authenticate=check_key if key else lambda header: None,
        key_required=key, started_unix_s=time.time() - 60,
    )  # fmt: skip


def serve(console: Console, calls):
    """Run ``calls(client)`` against the router's app with the console's routes on it."""

    async def main():
        app = make_app(console.router)
        console.add_routes(app)
        async with TestClient(TestServer(app)) as client:
            return await calls(client)

    return asyncio.run(main())


def test_page_and_assets_are_served_from_the_package_with_a_strict_policy(tmp_path):
    async def calls(client):
        out = {}
        for path in ("/console", "/console/", "/console/static/console.js",
                     "/console/static/console.css", "/console/static/index.html",
                     "/console/static/..%2fconsole.py", "/console/static/nope.js"):  # fmt: skip
            r = await client.get(path, allow_redirects=False)
            out[path] = (r.status, r.headers.get("Content-Type", ""), await r.text(),
                         r.headers.get("Content-Security-Policy"))  # fmt: skip
        return out

    got = serve(make_console(tmp_path, RecentSpans()), calls)
    status, ctype, body, csp = got["/console/"]
    assert (status, csp) == (200, CSP) and ctype.startswith("text/html")
    assert '<script src="/console/static/console.js"' in body and "http" not in body.lower()
    assert got["/console"][:3] == got["/console/"][:3]
    assert got["/console/static/console.js"][:2] == (200, "application/javascript")
    assert "fetch(`/console/api/" in got["/console/static/console.js"][2]
    assert got["/console/static/console.css"][1] == "text/css"
    for path in ("/console/static/index.html", "/console/static/..%2fconsole.py",
                 "/console/static/nope.js"):  # fmt: skip
        assert got[path][0] == 404, path


def test_api_needs_the_key_when_one_is_set(tmp_path):
    async def calls(client):
        out = []
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}"}):
            for path in ("overview", "cluster", "requests", "load", "requests/x", "auth"):
                r = await client.get(f"/console/api/{path}", headers=headers)
                out.append((path, headers.get("Authorization"), r.status, await r.json()))
        return out

    got = serve(make_console(tmp_path, RecentSpans()), calls)
    by = {(path, auth): (status, body) for path, auth, status, body in got}
    for path in ("overview", "cluster", "requests", "load", "requests/x"):
        for auth in (None, "Bearer wrong"):
            status, body = by[(path, auth)]
            assert status == 401 and body["error"]["code"] == "invalid_api_key", (path, auth)
    assert by[("auth", None)] == (200, {"key_required": True, "key_ok": False})
    assert by[("auth", f"Bearer {KEY}")] == (200, {"key_required": True, "key_ok": True})
    ok = f"Bearer {KEY}"
    assert by[("overview", ok)][1]["disagg_threshold_tokens"] == 32
    assert by[("overview", ok)][1]["trace_source"] == "span files"
    assert by[("overview", ok)][1]["jaeger_url"] == "http://jaeger.example:16686"
    [decode] = by[("cluster", ok)][1]["workers"]
    assert (decode["worker_id"], decode["kv_used_ratio"]) == ("decode-1", 0.25)
    assert by[("requests", ok)] == (200, {"requests": [], "num_held": 0})
    status, body = by[("requests/x", ok)]
    assert status == 404 and body["error"]["code"] == "request_not_found"


def test_request_view_merges_the_routers_spans_with_the_span_files(tmp_path):
    spans = RecentSpans()
    provider = TracerProvider(resource=Resource.create({"service.name": "pdserve-router"}))
    provider.add_span_processor(spans)
    start_ns = time.time_ns() - 5_000 * MS
    record_request(provider.get_tracer("test"), "req-1", start_ns)
    trace_id = spans.requests()[0].trace_id
    # The decode worker's span of the same trace, in its span file (another process).
    line = json.loads(span_line(trace_id, "00000000000000aa", "kv.fetch"))
    line |= {"start_ns": start_ns + 200 * MS, "end_ns": start_ns + 210 * MS,
             "attributes": {"pdserve.kv.bytes": 2048}}  # fmt: skip
    (tmp_path / "pdserve-decode-1.spans.jsonl").write_text(json.dumps(line) + "\n")

    record_request(provider.get_tracer("test"), "req-2", start_ns + 1000 * MS)

    async def calls(client):
        r = await client.get("/console/api/requests/req-1")
        load = await client.get("/console/api/load")
        pages = [await (await client.get(f"/console/api/requests{q}")).json()
                 for q in ("", "?limit=1", "?limit=x")]  # fmt: skip
        return r.status, await r.json(), r.headers["Cache-Control"], await load.json(), pages

    status, body, cache, load, pages = serve(make_console(tmp_path, spans, key=False), calls)
    assert [[r["request_id"] for r in p["requests"]] for p in pages[:2]] == [
        ["req-2", "req-1"], ["req-2"],
    ]  # fmt: skip
    assert pages[1]["num_held"] == 2 and pages[2]["error"]["param"] == "limit"
    assert status == 200 and cache == "no-store"
    assert body["request"]["request_id"] == "req-1" and body["request"]["ttft_ms"] == 100.0
    assert body["route"]["decision"] == "disaggregated"
    rows = body["waterfall"]["rows"]
    assert [(r["name"], r["hop"]) for r in rows if r["kind"] == "span"] == [
        ("router.request", "router"), ("router.route", "router"), ("kv.fetch", "decode"),
    ]  # fmt: skip
    [fetch] = [r for r in rows if r["name"] == "kv.fetch"]
    assert (fetch["kv_bytes"], fetch["bytes_text"]) == (2048, "2.0 KiB")
    assert load["overall"]["requests"] == 2 and load["overall"]["ttft_ms"]["p50"] == 100.0


def test_jaeger_link_is_the_setting_else_the_collectors_host():
    assert jaeger_ui_url("http://ui:80", "http://jaeger:4317") == "http://ui:80"
    assert jaeger_ui_url(None, "http://localhost:4317") == "http://localhost:16686"
    assert jaeger_ui_url(None, "jaeger:4317") == "http://jaeger:16686"
    assert jaeger_ui_url(None, "https://[::1]:4317") == "http://[::1]:16686"
    assert jaeger_ui_url(None, None) is None and jaeger_ui_url(None, "") is None
