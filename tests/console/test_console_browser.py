"""The operator console in a real headless browser, against the real stack.

``pdserve up``'s launcher starts Redis, a kvstore, one prefill and one decode worker and the
router (with an API key, span files in a temporary directory); one disaggregated and one
colocated request go through the SDK; then Debian's Chromium, driven by Playwright, opens
``/console/`` at a laptop's size (1366x768), gives the key, sees both workers and both
requests, opens the disaggregated one and reads its waterfall: the prefill, the KV transfer
with its exact byte count, the decode. Screenshots are kept under
``$PDSERVE_TEST_ARTIFACTS/console`` (default ``runs/test-artifacts/console``). The page must
not scroll sideways at 1366 or 1280 pixels and must log no console error, raise no page
error and get no failed response.

The API checks (key required, cluster figures from the heartbeats) need no browser. The
browser test is skipped, with the reason, only when no Chromium is installed (``make setup``
installs Debian's ``chromium`` with apt-get when it runs as root) or Playwright is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pdserve.client import Client
from pdserve.kv.metadata import RedisLayout, WorkerRegistry, connect
from pdserve.launcher import Stack, StackConfig
from pdserve.trace_view import _bytes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

KEY = "console-test-key-7f3a"
BLOCK_SIZE = 16
BLOCK_BYTES = 737_280  # SmolLM2-135M, one 16-token block in float32 (half that in bf16)
KV_CACHE_BYTES = 64 * BLOCK_BYTES  # a whole number of blocks in either dtype
THRESHOLD_TOKENS = 32
STACK_ENV = {
    "PDSERVE_ROUTER_DISAGG_THRESHOLD_TOKENS": str(THRESHOLD_TOKENS),
    # The static rule, so the long prompt is disaggregated and the short one is not, whatever
    # the cost model would predict on this machine.
    "PDSERVE_ROUTER_DISAGGREGATION_POLICY": "threshold",
    "PDSERVE_ROUTER_API_KEY": KEY,
    "PDSERVE_PREFILL_KV_CACHE_BYTES": str(KV_CACHE_BYTES),
    "PDSERVE_DECODE_KV_CACHE_BYTES": str(KV_CACHE_BYTES),
    "PDSERVE_KVSTORE_DRAM_CAPACITY_BYTES": str(128 * BLOCK_BYTES),
    "PDSERVE_PREFILL_NUM_THREADS": "1",
    "PDSERVE_DECODE_NUM_THREADS": "1",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "",  # span files, whatever the test environment says
}
# Chromium as root on a machine without network: no sandbox (Playwright adds --no-sandbox),
# and none of the background connections that would be refused.
CHROMIUM_ARGS = [
    "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]  # fmt: skip
LAPTOP = {"width": 1366, "height": 768}
SMALL_LAPTOP = {"width": 1280, "height": 720}
WAIT_MS = 30_000
# True once the waterfall's rows named args[0] on hop args[1] carry args[2] bytes in all.
SUM_BYTES = """([name, hop, want]) => [...document.querySelectorAll(
    `[data-testid=wf-row][data-kind=span][data-name="${name}"]`)]
  .filter((e) => e.dataset.hop.startsWith(hop))
  .reduce((n, e) => n + Number(e.dataset.bytes || 0), 0) === want"""


def chromium_binary() -> str | None:
    for name in (os.environ.get("PDSERVE_CHROMIUM"), "chromium", "chromium-browser"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def artifact_dir() -> Path:
    root = Path(os.environ.get("PDSERVE_TEST_ARTIFACTS") or "runs/test-artifacts")
    path = root / "console"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser():
    binary = chromium_binary()
    if binary is None:
        pytest.skip(
            "no Chromium on PATH: `make setup` installs Debian's chromium package with apt-get "
            "(as root); or point PDSERVE_CHROMIUM at a Chromium binary"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'"
    )
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=binary, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if os.environ.get("PDSERVE_E2E", "1") != "1":
        pytest.skip("PDSERVE_E2E=0")
    env = {**STACK_ENV, "PDSERVE_TRACE_DIR": str(tmp_path_factory.mktemp("traces"))}
    config = StackConfig(
        num_prefill=1, num_decode=1, default_ports=False, env=env, startup_timeout_s=240,
        log_dir=tmp_path_factory.mktemp("console-logs"), cluster_name=f"console{os.getpid()}",
    )  # fmt: skip
    with Stack(config) as running:
        yield running


@pytest.fixture(scope="module")
def two_requests(stack):
    """(disaggregated, colocated) completions, each checked for the route it took."""
    long_prompt = "Rivers carve valleys and mountains rise where plates collide. " * 6
    with Client(stack.grpc_address, token=KEY, timeout_s=120) as client:
        disagg = client.generate(
            long_prompt, max_tokens=2, temperature=0.0, ignore_eos=True, request_id="console-disagg"
        )
        local = client.generate(
            "Hello there.", max_tokens=2, temperature=0.0, ignore_eos=True,
            request_id="console-local",
        )  # fmt: skip
    assert disagg.route.disaggregated and not local.route.disaggregated
    return disagg, local


def get_json(url: str, key: str | None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


class PageProblems:
    """Console errors, uncaught page errors and failed or refused responses of one page."""

    def __init__(self, page) -> None:
        self.items: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.items.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.items.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.items.append(f"failed: {r.url} {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and self.items.append(f"{r.status}: {r.url}"))


def no_sideways_scroll(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_console_api_needs_the_key_and_reports_the_cluster(stack, two_requests):
    url = stack.http_url + "/console/api/requests"
    assert get_json(url, None)[0] == 401
    assert get_json(url, "wrong")[0] == 401
    status, body = get_json(url, KEY)
    assert status == 200
    assert {"console-disagg", "console-local"} <= {r["request_id"] for r in body["requests"]}
    assert get_json(stack.http_url + "/console/api/auth", None)[1] == {
        "key_required": True, "key_ok": False,
    }  # fmt: skip
    # The heartbeats carry what the cluster view shows: step times, the store's hits.
    deadline = time.monotonic() + 20
    while True:
        workers = {
            w["role"]: w
            for w in get_json(stack.http_url + "/console/api/cluster", KEY)[1]["workers"]
        }
        if (
            (workers["prefill"]["step_ms"] or 0) > 0
            and (workers["decode"]["step_ms"] or 0) > 0
            and (workers["kvstore"]["num_hits"] or 0) >= 1
        ):
            break
        assert time.monotonic() < deadline, {
            r: {k: v for k, v in w.items() if k in ("step_ms", "num_hits", "num_misses", "tiers")}
            for r, w in workers.items()
        }
        time.sleep(0.5)
    assert workers["kvstore"]["hit_rate"] > 0
    assert [t["tier"] for t in workers["kvstore"]["tiers"]] == ["dram"]


def test_console_shows_the_cluster_the_requests_and_the_handoff(stack, two_requests, browser):
    disagg, _ = two_requests
    registry = WorkerRegistry(connect(stack.redis_url), RedisLayout(stack.config.cluster_name), 10)
    workers = {w.role: w for w in registry.workers() if w.role != "router"}
    worker_ids = {role: w.worker_id for role, w in workers.items()}
    # The engine's own block geometry (its KV dtype depends on the engine's settings): the
    # pool it sized from KV_CACHE_BYTES, as its heartbeat reports it.
    block_bytes = KV_CACHE_BYTES // workers["decode"].capacity["num_blocks"]
    shots = artifact_dir()
    context = browser.new_context(viewport=LAPTOP)
    page = context.new_page()
    problems = PageProblems(page)
    try:
        page.goto(stack.endpoints()["console"])  # the address `pdserve up` prints
        page.fill("#key-input", KEY)  # the key form: this router has an API key
        page.click("#key-form button[type=submit]")

        # Cluster: both engine workers (and the KV store) by their registry ids.
        for role in ("prefill", "decode", "kvstore"):
            card = page.locator(f'[data-testid=worker][data-worker-id="{worker_ids[role]}"]')
            card.wait_for(timeout=WAIT_MS)
            assert card.get_attribute("data-role") == role
        assert "KV pool" in page.locator("[data-testid=worker][data-role=decode]").inner_text()
        assert "dram" in page.locator("[data-testid=worker][data-role=kvstore]").inner_text()

        # Requests: both, with the route each took.
        rows = {
            rid: page.locator(f'[data-testid=request-row][data-request-id="{rid}"]')
            for rid in ("console-disagg", "console-local")
        }
        for row in rows.values():
            row.wait_for(timeout=WAIT_MS)
        assert rows["console-disagg"].get_attribute("data-route") == "disaggregated"
        assert rows["console-local"].get_attribute("data-route") == "local"
        page.screenshot(path=str(shots / "console-overview.png"), full_page=True)

        # The disaggregated request's waterfall: prefill, the KV transfer and its bytes, decode.
        rows["console-disagg"].click()
        waterfall = page.locator("[data-testid=waterfall]")
        nbytes = (disagg.route.prompt_tokens // BLOCK_SIZE) * block_bytes
        fetch = waterfall.locator('[data-testid=wf-row][data-name="kv.fetch"]')
        # The workers' spans reach their files about a second after the request ends.
        page.wait_for_function(SUM_BYTES, arg=["kv.fetch", "decode@", nbytes], timeout=WAIT_MS)
        for i in range(fetch.count()):
            assert (
                _bytes(int(fetch.nth(i).get_attribute("data-bytes"))) in fetch.nth(i).inner_text()
            )
        for name, hop in (("prefill.request", "prefill@"), ("kv.put", "kvstore@"),
                          ("kv.get", "kvstore@"), ("decode.loop", "decode@")):  # fmt: skip
            row = waterfall.locator(
                f'[data-testid=wf-row][data-kind=span][data-name="{name}"][data-hop^="{hop}"]'
            )
            row.first.wait_for(timeout=WAIT_MS)
        page.wait_for_function(SUM_BYTES, arg=["kv.put", "prefill@", nbytes], timeout=WAIT_MS)
        reason = page.locator("[data-testid=route-reason]").inner_text()
        assert "why disaggregated" in reason and f">= threshold {THRESHOLD_TOKENS}" in reason

        # Usable at a laptop's width: no sideways scroll, the transfer's bytes on screen.
        assert no_sideways_scroll(page)
        box = fetch.first.locator(".wf-num").last.bounding_box()
        assert box is not None and box["x"] + box["width"] <= LAPTOP["width"]
        fetch.first.scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "console-disaggregated.png"), full_page=True)
        page.set_viewport_size(SMALL_LAPTOP)
        assert no_sideways_scroll(page)
        page.screenshot(path=str(shots / "console-1280.png"))
        assert problems.items == []
    except Exception:
        page.screenshot(path=str(shots / "console-failure.png"), full_page=True)
        raise
    finally:
        context.close()
