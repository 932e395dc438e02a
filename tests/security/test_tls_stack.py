"""The whole stack under ``pdserve up --tls`` (the launcher's throw-away CA, the real model) with
three tenants from an API-keys file.

- TLS: the SDK and the official ``openai`` package work over TLS; plain-text clients are
  refused; the kvstore refuses callers with no certificate or a foreign one; the handoff
  still works (mTLS between router, prefill, kvstore, decode) and is still one trace.
- Tenants: the same long prompt from two tenants never shares a KV block (the route
  explanation and the store's counters say so) while one tenant's two requests do; a tenant
  over its rate limit gets 429 / RESOURCE_EXHAUSTED with Retry-After, the others do not;
  usage per tenant in the router's /metrics.

One stack for the module (1 prefill, 1 decode); tiny outputs.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request

import grpc
import pytest

from pdserve.client import Client, ResourceExhausted, Unauthenticated, Unavailable
from pdserve.kv.blocks import Tier
from pdserve.kv.errors import KVError
from pdserve.kv.grpc_transport import GrpcTransport
from pdserve.launcher import Stack, StackConfig
from pdserve.span_file import read_spans, span_files
from pdserve.tls import ClusterSecurity, issue_certificate, make_ca
from tests.observability.test_stack_tracing import (
    MAX_TOKENS,
    STACK_ENV,
    check_trace,
    long_prompt,
    wait_for_trace,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

KEYS = {
    "acme": {"keys": ["sk-acme"]},
    "beta": {"keys": ["sk-beta"]},
    "capped": {"keys": ["sk-capped"], "requests_per_minute": 1},
}
SHARED_PROMPT = "Tenants must not share this. " + "Glaciers grind rock into fine flour. " * 8


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("traces")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, trace_dir):
    if os.environ.get("PDSERVE_E2E", "1") != "1":
        pytest.skip("PDSERVE_E2E=0")
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        pytest.skip("OTEL_EXPORTER_OTLP_ENDPOINT is set in the test environment")
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    keys_file.write_text(json.dumps({"tenants": KEYS}))
    env = {**STACK_ENV, "PDSERVE_TRACE_DIR": str(trace_dir),
           "PDSERVE_ROUTER_API_KEYS_FILE": str(keys_file)}  # fmt: skip
    config = StackConfig(
        num_prefill=1, num_decode=1, default_ports=False, env=env, tls=True,
        log_dir=tmp_path_factory.mktemp("tls-logs"), startup_timeout_s=240,
        cluster_name=f"tls{os.getpid()}",
    )  # fmt: skip
    with Stack(config) as running:
        yield running


def client(stack: Stack, key: str) -> Client:
    return Client(stack.grpc_address, root_certificates=stack.pki.ca_file.read_bytes(),
                  token=key, timeout_s=120)  # fmt: skip


def https(stack: Stack) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(stack.pki.ca_file))


def store_stats(stack: Stack):
    """The kvstore's counters, asked over mTLS as the cluster's router."""
    kv = GrpcTransport(stack.kvstore_address, security=stack.security, timeout_s=10)
    try:
        return kv.stats()
    finally:
        kv.close()


def test_sdk_over_tls_and_the_handoff_is_one_trace(stack, trace_dir):
    assert stack.http_url.startswith("https://")
    with client(stack, "sk-acme") as c:
        done = c.generate(long_prompt(1), max_tokens=MAX_TOKENS, temperature=0.0,
                          ignore_eos=True, request_id="tls-1")  # fmt: skip
    assert done.route.disaggregated and done.usage.completion_tokens == MAX_TOKENS
    spans = wait_for_trace(lambda: read_spans(span_files(trace_dir)), "tls-1")
    check_trace(spans, "tls-1")  # prefill → kvstore → decode, every byte accounted


def test_official_openai_package_over_https(stack):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(
        base_url=stack.http_url + "/v1", api_key="sk-beta", max_retries=0,
        http_client=openai.DefaultHttpxClient(verify=https(stack)),
    )  # fmt: skip
    model = api.models.list().data[0].id
    done = api.completions.create(model=model, prompt="The capital of France is", max_tokens=3,
                                  temperature=0)  # fmt: skip
    assert done.choices[0].text and done.usage.completion_tokens <= 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=stack.http_url + "/v1", api_key="sk-nobody", max_retries=0,
            http_client=openai.DefaultHttpxClient(verify=https(stack)),
        ).models.list()  # fmt: skip


def test_plain_text_clients_are_refused(stack):
    plain = Client(stack.grpc_address, token="sk-acme", timeout_s=10, max_retries=0)
    with plain, pytest.raises(Unavailable):
        plain.models()
    with client(stack, "sk-wrong") as c, pytest.raises(Unauthenticated):
        c.models()  # TLS is not a credential: the key still is
    http_url = stack.http_url.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(http_url + "/v1/models", timeout=10).read()
    # the workers take only mTLS callers too
    for name, call in (
        ("prefill-0", lambda ch: ch.unary_unary("/pdserve.v1.Prefill/Prefill")(b"", timeout=10)),
        (
            "decode-0",
            lambda ch: list(ch.unary_stream("/pdserve.v1.Decode/Decode")(b"", timeout=10)),
        ),
    ):
        channel = grpc.insecure_channel(stack.endpoints()[name])
        with channel, pytest.raises(grpc.RpcError) as refused:
            call(channel)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, name


@pytest.mark.parametrize("caller", ["no-certificate", "foreign-certificate"])
def test_the_kvstore_refuses_get_and_put_without_a_cluster_certificate(stack, tmp_path, caller):
    if caller == "no-certificate":
        security = ClusterSecurity(cluster_name=stack.config.cluster_name)
    else:  # a certificate for a "router" of the same name, from a CA that is not the cluster's
        ca = make_ca(stack.config.cluster_name)
        pem = issue_certificate(ca, stack.config.cluster_name, "router", hosts=["127.0.0.1"])
        (tmp_path / "c.pem").write_bytes(pem.cert)
        (tmp_path / "k.pem").write_bytes(pem.key)
        security = ClusterSecurity(
            cluster_name=stack.config.cluster_name, cert_file=tmp_path / "c.pem",
            key_file=tmp_path / "k.pem", ca_file=stack.pki.ca_file,
        )  # fmt: skip
    kv = GrpcTransport(stack.kvstore_address, security=security, timeout_s=10)
    key = bytes(16)
    try:
        with pytest.raises(KVError, match="UNAVAILABLE"):
            kv.put_blocks([(key, b"\0" * 1024)])
        with pytest.raises(KVError, match="UNAVAILABLE"):
            kv.get_blocks([key])
    finally:
        kv.close()
    plain = grpc.insecure_channel(stack.kvstore_address)
    with pytest.raises(grpc.RpcError) as refused:
        plain.unary_unary("/pdserve.v1.KVStore/Stats")(b"", timeout=10)
    plain.close()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def cached_tokens(route) -> int:
    """What the route explanation says came from a cache: prompt minus computed tokens."""
    return route.prompt_tokens - route.uncached_tokens


def locations(route) -> int:
    """The longest prefix any node was seen holding for this request (the location index)."""
    return max((sum(tiers.values()) for tiers in route.cached.values()), default=0)


def test_two_tenants_never_share_a_kv_block_one_tenants_requests_do(stack):
    stats0 = store_stats(stack)
    runs = {}
    for name, key in (("acme-1", "sk-acme"), ("acme-2", "sk-acme"), ("beta", "sk-beta")):
        with client(stack, key) as c:
            runs[name] = c.generate(SHARED_PROMPT, max_tokens=1, temperature=0.0, ignore_eos=True)
        runs[name + ":stats"] = store_stats(stack)
    first, again, beta = runs["acme-1"], runs["acme-2"], runs["beta"]
    num_blocks = first.usage.prompt_tokens // 16
    assert first.route.disaggregated and num_blocks >= 4

    def stored(stats) -> int:
        return stats.tier(Tier.DRAM).num_blocks

    # acme's first request computed and stored its blocks; its second reuses them, stores none
    assert cached_tokens(first.route) == 0
    assert stored(runs["acme-1:stats"]) - stored(stats0) == num_blocks
    assert cached_tokens(again.route) >= (num_blocks - 1) * 16, again.route
    assert stored(runs["acme-2:stats"]) == stored(runs["acme-1:stats"])
    # beta: nothing cached for it anywhere, every token computed, its blocks stored separately
    assert cached_tokens(beta.route) == 0 and locations(beta.route) == 0, beta.route
    assert stored(runs["beta:stats"]) - stored(runs["acme-2:stats"]) == num_blocks


def scrape(stack: Stack) -> str:
    with urllib.request.urlopen(stack.http_url + "/metrics", context=https(stack)) as r:
        return r.read().decode()


def test_a_tenant_over_its_rate_limit_gets_429_with_retry_after_others_do_not(stack):
    with client(stack, "sk-capped") as capped:
        capped.generate("Hello", max_tokens=1, temperature=0.0)
        with pytest.raises(ResourceExhausted) as refused:
            capped.generate("Hello", max_tokens=1, temperature=0.0)
    assert 0 < refused.value.retry_after_s <= 60
    body = json.dumps({"prompt": "Hello", "max_tokens": 1}).encode()
    request = urllib.request.Request(
        stack.http_url + "/v1/completions", data=body, method="POST",
        headers={"Content-Type": "application/json", "Authorization": "Bearer sk-capped"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as http_refused:
        urllib.request.urlopen(request, context=https(stack), timeout=30)
    assert http_refused.value.code == 429
    assert 0 < int(http_refused.value.headers["Retry-After"]) <= 60
    assert json.loads(http_refused.value.read())["error"]["code"] == "rate_limit_exceeded"
    with client(stack, "sk-acme") as acme:
        assert acme.generate("Hello", max_tokens=1, temperature=0.0).usage.completion_tokens == 1
    text = scrape(stack)
    assert 'pdserve_tenant_requests_total{outcome="rate_limited",tenant="capped"} 2.0' in text
    assert 'pdserve_tenant_requests_total{outcome="ok",tenant="capped"} 1.0' in text
    assert 'pdserve_tenant_tokens_total{kind="completion",tenant="capped"} 1.0' in text
    assert 'tenant="acme"' in text and "sk-" not in text
