"""Prometheus metrics of every pdserve service, and the ``/metrics`` + ``/health`` server.

All metrics live in prometheus-client's default registry and are defined here, once, so the
names, units and label sets are the same in every process; each service updates the ones
that concern it (the router the request latencies, the kvstore the tiers, ...). Names start
with ``pdserve_`` and end with their unit. the README's "Observability" section lists them all.

Label values are closed sets (no request ids, no worker ids: Prometheus adds ``instance``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from pdserve.port_file import listen_port

# Buckets suited to LLM serving: TTFT spans 10 ms (cached, short prompt) to a minute (long
# prompt under load); inter-token gaps 1 ms (GPU) to 1 s (a stalled CPU batch).
TTFT_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
ITL_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
E2E_BUCKETS_S = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
QUEUE_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
TRANSFER_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
STEP_BUCKETS_S = ITL_BUCKETS_S + (5.0, 10.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

# --- requests (router; decode observes its own ITL) -------------------------------------------

TIME_TO_FIRST_TOKEN = Histogram(
    "pdserve_time_to_first_token_seconds",
    "Arrival at the router to the first token sent to the client.",
    ["route"], buckets=TTFT_BUCKETS_S,
)  # fmt: skip
INTER_TOKEN_LATENCY = Histogram(
    "pdserve_inter_token_latency_seconds",
    "Gap between consecutive output tokens of one request (one observation per token).",
    buckets=ITL_BUCKETS_S,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "pdserve_time_per_output_token_seconds",
    "Per request: (end-to-end - TTFT) / (output tokens - 1).",
    ["route"], buckets=ITL_BUCKETS_S,
)  # fmt: skip
E2E_REQUEST_LATENCY = Histogram(
    "pdserve_e2e_request_latency_seconds",
    "Arrival at the router to the last token (or the error).",
    ["route", "finish_reason"], buckets=E2E_BUCKETS_S,
)  # fmt: skip
REQUESTS = Counter(
    "pdserve_requests",
    "Finished requests by finish reason (stop, length, abort, error) and route.",
    ["finish_reason", "route"],
)
ROUTE_DECISIONS = Counter(
    "pdserve_route_decisions",
    "Routing decisions: route (disaggregated, local) and the policy's reason.",
    ["route", "reason"],
)
REJECTED_REQUESTS = Counter(
    "pdserve_rejected_requests",
    "Requests refused by admission control (queue_full, deadline, invalid).",
    ["reason"],
)
ROUTER_MIGRATIONS = Counter(
    "pdserve_router_migrations",
    "Requests moved to another decode worker mid-stream, by reason (unavailable, stall, "
    "overloaded, deadline, error).",
    ["reason"],
)
PROMPT_TOKENS = Counter("pdserve_prompt_tokens", "Prompt tokens of admitted requests.")
GENERATION_TOKENS = Counter("pdserve_generation_tokens", "Output tokens streamed to clients.")
REQUEST_PROMPT_TOKENS = Histogram(
    "pdserve_request_prompt_tokens", "Prompt length per request.", buckets=TOKEN_BUCKETS
)
REQUEST_GENERATION_TOKENS = Histogram(
    "pdserve_request_generation_tokens", "Output length per request.", buckets=TOKEN_BUCKETS
)
# Per tenant (router; label values: the tenants of the keys file, a closed set).
TENANT_REQUESTS = Counter(
    "pdserve_tenant_requests",
    "Requests per tenant by outcome (ok, error, cancelled, rate_limited).",
    ["tenant", "outcome"],
)
TENANT_TOKENS = Counter(
    "pdserve_tenant_tokens",
    "Tokens per tenant: prompt, cached (of the prompt), completion.",
    ["tenant", "kind"],
)

# --- queues and batches (every service) ------------------------------------------------------

QUEUE_DEPTH = Gauge(
    "pdserve_queue_depth_requests",
    "Requests waiting in a queue (router_admitted, prefill_waiting, decode_waiting, "
    "decode_kv_fetching).",
    ["queue"],
)
QUEUE_WAIT = Histogram(
    "pdserve_queue_wait_seconds",
    "Time a request spent in a queue before being served.",
    ["queue"], buckets=QUEUE_BUCKETS_S,
)  # fmt: skip
RUNNING_BATCH_SIZE = Gauge(
    "pdserve_running_batch_size_requests",
    "Sequences in the running batch (decode) or in the current prompt batch (prefill).",
)
BATCH_TOKENS = Histogram(
    "pdserve_batch_tokens",
    "Tokens computed per engine step, by phase (prefill, decode, mixed).",
    ["phase"], buckets=TOKEN_BUCKETS,
)  # fmt: skip
STEP_DURATION = Histogram(
    "pdserve_engine_step_duration_seconds",
    "Wall time of one engine step, by phase (prefill, decode, mixed).",
    ["phase"], buckets=STEP_BUCKETS_S,
)  # fmt: skip
KV_CACHE_USAGE = Gauge(
    "pdserve_kv_cache_usage_ratio", "Used share of the worker's own paged KV pool (0..1)."
)

# --- KV transfer and the prefix cache -------------------------------------------------------

KV_TRANSFER_BYTES = Counter(
    "pdserve_kv_transfer_bytes",
    "KV block bytes moved: direction (put, get), transport (grpc, shm, local), tier.",
    ["direction", "transport", "tier"],
)
KV_TRANSFER_BLOCKS = Counter(
    "pdserve_kv_transfer_blocks",
    "KV blocks moved: direction (put, get), transport (grpc, shm, local), tier.",
    ["direction", "transport", "tier"],
)
KV_TRANSFER_DURATION = Histogram(
    "pdserve_kv_transfer_duration_seconds",
    "Wall time of one KV put or get call (all its blocks).",
    ["direction", "transport", "tier"], buckets=TRANSFER_BUCKETS_S,
)  # fmt: skip
KV_FETCH_FALLBACKS = Counter(
    "pdserve_kv_fetch_fallbacks",
    "Decode KV fetches abandoned for local recompute (timeout, miss, mismatch, error).",
    ["reason"],
)
PREFIX_CACHE_QUERY_TOKENS = Counter(
    "pdserve_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache."
)
PREFIX_CACHE_HIT_TOKENS = Counter(
    "pdserve_prefix_cache_hit_tokens",
    "Prompt tokens found cached, by the tier that served them (hbm, dram, ssd).",
    ["tier"],
)

# --- the tiered store (kvstore) ---------------------------------------------------------------

KV_TIER_USED_BYTES = Gauge("pdserve_kv_tier_used_bytes", "Bytes held by a tier.", ["tier"])
KV_TIER_CAPACITY_BYTES = Gauge(
    "pdserve_kv_tier_capacity_bytes", "Configured capacity of a tier.", ["tier"]
)
KV_TIER_BLOCKS = Gauge("pdserve_kv_tier_blocks", "Blocks held by a tier.", ["tier"])
KV_EVICTIONS = Counter(
    "pdserve_kv_evictions", "Blocks dropped from the last tier under pressure.", ["tier"]
)
KV_DEMOTIONS = Counter(
    "pdserve_kv_demotions", "Blocks moved one tier down (labelled by the source tier).", ["tier"]
)
KV_PROMOTIONS = Counter(
    "pdserve_kv_promotions", "Blocks moved up on a hit (labelled by the source tier).", ["tier"]
)

# --- control plane ----------------------------------------------------------------------------

REDIS_ERRORS = Counter(
    "pdserve_redis_errors",
    "Failed Redis operations (heartbeat, publish, lookup, stream, ...).",
    ["operation"],
)
WORKERS = Gauge(
    "pdserve_workers", "Live workers seen in the registry, by role (router's view).", ["role"]
)
SERVICE_INFO = Info("pdserve_service", "Role, node, worker id, model and version of this process.")


def exposed_names(registry: CollectorRegistry = REGISTRY) -> set[str]:
    """Every sample name pdserve's metrics can expose (``_bucket``, ``_total``, ...)."""
    names: set[str] = set()
    for family in _pdserve_families(registry):
        base = family.name
        if family.type == "counter":
            names |= {f"{base}_total", f"{base}_created"}
        elif family.type == "histogram":
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}
        elif family.type == "info":
            names.add(f"{base}_info")
        else:
            names.add(base)
    return names


def _pdserve_families(registry: CollectorRegistry) -> list[Any]:
    families = []
    for collector in list(registry._collector_to_names):  # noqa: SLF001 - no public iterator
        describe = getattr(collector, "describe", None)
        for family in describe() if describe else []:
            if family.name.startswith("pdserve_"):
                families.append(family)
    return families


# --- the HTTP endpoint ------------------------------------------------------------------------


class MetricsServer:
    """``GET /metrics`` (Prometheus text) and ``GET /health`` on a daemon thread.

    ``health`` returns True when the service is ready (200 ``ok``); False gives 503.
    ``port=0`` binds a free port (see ``.port``).
    """

    def __init__(
        self,
        port: int,
        host: str = "0.0.0.0",
        *,
        health: Callable[[], bool] | None = None,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        handler = _handler_class(health or (lambda: True), registry)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="pdserve-metrics", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_class(health: Callable[[], bool], registry: CollectorRegistry) -> type:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/health":
                ok = _safe(health)
                self._send(200 if ok else 503, "text/plain", b"ok\n" if ok else b"unavailable\n")
            else:
                self._send(404, "text/plain", b"not found: try /metrics or /health\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes are not news
            pass

    return Handler


def _safe(health: Callable[[], bool]) -> bool:
    try:
        return bool(health())
    except Exception:  # noqa: BLE001 - a broken probe reads as unhealthy, not a 500
        return False


def start_metrics_server(
    port: int, host: str = "0.0.0.0", *, health: Callable[[], bool] | None = None
) -> MetricsServer | None:
    """Serve ``/metrics`` and ``/health``; ``port`` from settings: 0 means disabled (None),
    ``FREE_PORT`` a free port (``.port``)."""
    if not port:
        return None
    return MetricsServer(listen_port(port), host, health=health)


async def aiohttp_metrics_handler(_request: Any) -> Any:
    """``app.router.add_get("/metrics", aiohttp_metrics_handler)`` for a service with its own
    aiohttp app (the router's OpenAI API)."""
    from aiohttp import web

    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def set_service_info(**fields: str | None) -> None:
    """``pdserve_service_info{role=..., node=..., ...} 1``; None values are left out."""
    SERVICE_INFO.info({k: str(v) for k, v in fields.items() if v is not None})
