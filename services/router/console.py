"""The operator console: a read-only page under ``/console`` on the router's HTTP port.

Routes (all GET)::

    /console, /console/          the page (console_static/index.html)
    /console/static/{name}       its script and style sheet, shipped in the package
    /console/api/auth            whether a key is needed and whether the one sent is good
    /console/api/overview        model, policy threshold, requests in flight, trace source
    /console/api/cluster         every registered worker (Redis registry): load, KV pool, tiers
    /console/api/requests        the recent requests, newest first
    /console/api/requests/{id}   one request: summary, routing decision, waterfall rows
    /console/api/load            TTFT / ITL percentiles and tokens/s over the last minutes

The page and its two assets hold no data and load without a key, so the page can ask for one
(``/console/api/auth`` says only whether a key is needed and whether the one sent is good);
every other ``/console/api`` call is checked like ``/v1`` (``Authorization: Bearer <api_key>``
when the router has a key) and answers with ``Cache-Control: no-store``. Nothing is fetched from
outside the router: the Content-Security-Policy allows this origin only. Read-only: no route
changes anything.

The data: the router's own spans in memory (:class:`RecentSpans`), the span files of a local
run (:class:`SpanFileTail`, when no OTLP endpoint is set) for the other hops of a waterfall,
and the worker registry. The logic is in console_data.py and pdserve/trace_view.py.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from pdserve.errors import InvalidRequest, NotFound, PdserveError, quoted
from pdserve.kv.metadata import WorkerRegistry
from pdserve.span_file import default_trace_dir
from pdserve.trace_view import Trace, waterfall
from services.router import console_data
from services.router.console_data import RecentSpans, SpanFileTail
from services.router.router import Router

ASSETS = {
    "index.html": "text/html",
    "console.js": "application/javascript",
    "console.css": "text/css",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
LOAD_WINDOW_S = 300.0
LOAD_BUCKET_S = 10.0
JAEGER_UI_PORT = 16686
REQUESTS_LIMIT = 200  # rows the request list sends by default


class RequestNotFound(NotFound):
    code = "request_not_found"


def jaeger_ui_url(jaeger_url: str | None, otlp_endpoint: str | None) -> str | None:
    """Where the console links a trace: ``jaeger_url`` when set, else the OTLP collector's
    host on Jaeger's UI port (Jaeger all-in-one takes OTLP and serves its UI on one host),
    None without a collector. Set ``jaeger_url`` when the browser reaches Jaeger by another
    name than the services do (docker-compose: ``jaeger`` inside, ``localhost`` outside)."""
    if jaeger_url:
        return jaeger_url
    if not otlp_endpoint:
        return None
    endpoint = otlp_endpoint if "//" in otlp_endpoint else f"http://{otlp_endpoint}"
    host = urllib.parse.urlsplit(endpoint).hostname
    if not host:
        return None
    return f"http://{f'[{host}]' if ':' in host else host}:{JAEGER_UI_PORT}"


def _load_assets() -> dict[str, bytes]:
    folder = resources.files("services.router") / "console_static"
    return {name: (folder / name).read_bytes() for name in ASSETS}


def _static_headers(content_type: str) -> dict[str, str]:
    return {
        "Content-Type": content_type,
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }


class Console:
    """The console's handlers; one per router process.

    ``authenticate`` is the API's own check: it takes the ``Authorization`` header (None when
    absent) and raises a PdserveError (Unauthenticated) unless the caller may use the API;
    ``key_required`` says whether any key is configured at all."""

    def __init__(
        self, router: Router, registry: WorkerRegistry, spans: RecentSpans, *,
        authenticate: Callable[[str | None], object], key_required: bool,
        started_unix_s: float | None = None,
    ) -> None:  # fmt: skip
        self.router = router
        self.settings = router.settings
        self.registry = registry
        self.spans = spans
        self._authenticate = authenticate
        self.key_required = key_required
        self.assets = _load_assets()
        s = self.settings
        self.files = None
        if not s.otlp_endpoint:
            directory = Path(s.trace_dir or default_trace_dir())
            self.files = SpanFileTail(directory, started_unix_s or time.time())

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/console", self.page)
        app.router.add_get("/console/", self.page)
        app.router.add_get("/console/static/{name}", self.asset)
        app.router.add_get("/console/api/auth", self.auth)
        app.router.add_get("/console/api/overview", self.overview)
        app.router.add_get("/console/api/cluster", self.cluster)
        app.router.add_get("/console/api/requests", self.requests)
        app.router.add_get("/console/api/requests/{request_id}", self.request_detail)
        app.router.add_get("/console/api/load", self.load)

    # ---- the page ----

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.assets["index.html"], headers=_static_headers(ASSETS["index.html"])
        )

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name == "index.html" or name not in ASSETS:
            raise web.HTTPNotFound()
        return web.Response(body=self.assets[name], headers=_static_headers(ASSETS[name]))

    # ---- the API ----

    def _auth(self, request: web.Request) -> None:
        self._authenticate(request.headers.get("Authorization"))

    @staticmethod
    def _json(data: Any) -> web.Response:
        return web.json_response(data, headers={"Cache-Control": "no-store"})

    async def auth(self, request: web.Request) -> web.Response:
        try:
            self._auth(request)
            key_ok = True
        except PdserveError:
            key_ok = False
        return self._json({"key_required": self.key_required, "key_ok": key_ok})

    async def overview(self, request: web.Request) -> web.Response:
        self._auth(request)
        s = self.settings
        return self._json({
            "model": self.router.model.name,
            "cluster_name": s.cluster_name,
            "node_id": s.node_id,
            "max_inflight_requests": s.max_inflight_requests,
            "disagg_threshold_tokens": s.disagg_threshold_tokens,
            "trace_source": "otlp" if s.otlp_endpoint else "span files",
            "otlp_endpoint": s.otlp_endpoint,
            "jaeger_url": jaeger_ui_url(s.console_jaeger_url, s.otlp_endpoint),
            "trace_dir": None if self.files is None else str(self.files.directory),
            **self.router.stats(),
        })  # fmt: skip

    async def cluster(self, request: web.Request) -> web.Response:
        self._auth(request)
        workers = await asyncio.to_thread(self.registry.workers)
        now_ms = int(time.time() * 1000)
        views = console_data.cluster_view(workers, now_ms, self.settings.heartbeat_interval_s)
        return self._json({"workers": views, "redis_ok": self.router.directory.redis_ok})

    async def requests(self, request: web.Request) -> web.Response:
        """The newest ``limit`` (default 200) of the requests held."""
        self._auth(request)
        try:
            limit = int(request.query.get("limit", REQUESTS_LIMIT))
        except ValueError:
            raise InvalidRequest("limit must be an integer", param="limit") from None
        held = self.spans.requests()
        return self._json({
            "requests": [r.to_json() for r in held[: max(limit, 0)]], "num_held": len(held),
        })  # fmt: skip

    async def request_detail(self, request: web.Request) -> web.Response:
        self._auth(request)
        wanted = request.match_info["request_id"]
        summary = next((r for r in self.spans.requests() if r.request_id == wanted), None)
        if summary is None:
            raise RequestNotFound(f"no recent request {quoted(wanted)} on this router")
        spans = await asyncio.to_thread(self._trace_spans, summary.trace_id)
        if not spans:
            raise RequestNotFound(f"the spans of request {quoted(wanted)} are no longer held")
        return self._json({
            "request": summary.to_json(),
            "route": console_data.route_details(spans),
            "waterfall": waterfall(Trace(summary.trace_id, spans)),
        })  # fmt: skip

    def _trace_spans(self, trace_id: str) -> list[dict]:
        """The router's spans from memory, the other hops' from this run's span files."""
        by_id = {s["span_id"]: s for s in self.spans.spans(trace_id)}
        if self.files is not None:
            self.files.poll()
            for span in self.files.spans(trace_id):
                by_id.setdefault(span["span_id"], span)
        return list(by_id.values())

    async def load(self, request: web.Request) -> web.Response:
        self._auth(request)
        series = console_data.load_series(
            self.spans.requests(), time.time(), LOAD_WINDOW_S, LOAD_BUCKET_S
        )
        return self._json(series)
