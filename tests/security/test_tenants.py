"""Tenants without a server: keys → tenant, cache namespaces, rate-limit arithmetic, the gate's
accounting. Exact outcomes on a fake clock."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
import structlog

from pdserve.engine.block_hash import chain_block_keys, root_key
from pdserve.errors import Unauthenticated, grpc_status, http_status
from services.router import tenants
from services.router.auth import RateLimited, TenantGate
from services.router.messages import Chunk, GenerateInput, Usage
from services.router.tenants import ApiKeys, KeysConfigError, RateLimiter, Tenant


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.json"
    digest = hashlib.sha256(b"sk-beta-1").hexdigest()
    path.write_text(json.dumps({"tenants": {
        "acme": {"keys": ["sk-acme-1", "sk-acme-2"], "requests_per_minute": 2},
        "beta": {"key_sha256": [digest], "tokens_per_minute": 100},
    }}))  # fmt: skip
    return path


def test_each_key_names_its_tenant_and_nothing_else_passes(keys_file):
    keys = ApiKeys.build(keys_file=keys_file, keys_env="gamma=sk-gamma", requests_per_minute=7)
    names = {h: (t.name if (t := keys.tenant_for(h)) else None) for h in (
        "Bearer sk-acme-1", "Bearer sk-acme-2", "Bearer sk-beta-1", "Bearer sk-gamma",
        "Bearer sk-acme-3", "Basic sk-acme-1", "sk-acme-1", "", None,
    )}  # fmt: skip
    assert names == {
        "Bearer sk-acme-1": "acme", "Bearer sk-acme-2": "acme", "Bearer sk-beta-1": "beta",
        "Bearer sk-gamma": "gamma", "Bearer sk-acme-3": None, "Basic sk-acme-1": None,
        "sk-acme-1": None, "": None, None: None,
    }  # fmt: skip
    acme, beta, gamma = keys.tenants
    assert (acme.requests_per_minute, acme.tokens_per_minute) == (2, 0)
    assert (beta.requests_per_minute, beta.tokens_per_minute) == (7, 100)  # file overrides
    assert (gamma.requests_per_minute, gamma.tokens_per_minute) == (7, 0)


def test_every_entry_is_compared_whichever_matches(keys_file, monkeypatch):
    """No early exit: the number of comparisons does not depend on which key was sent."""
    keys = ApiKeys.build(keys_file=keys_file)
    calls = []
    real = tenants.hmac.compare_digest
    monkeypatch.setattr(tenants.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    counts = []
    for header in ("Bearer sk-acme-1", "Bearer sk-beta-1", "Bearer nobody"):
        calls.clear()
        keys.tenant_for(header)
        counts.append(len(calls))
    assert counts == [3, 3, 3]


def test_no_keys_means_one_open_tenant_that_keeps_the_client_salt():
    tenant = ApiKeys().tenant_for(None)
    assert tenant.name == tenants.OPEN_TENANT and not tenant.isolated
    assert tenant.cache_salt("abc") == "abc" and tenant.cache_salt("") == ""


@pytest.mark.parametrize(
    "doc, error",
    [
        ({"tenants": {"a": {"keys": ["k"]}, "b": {"keys": ["k"]}}}, "listed twice"),
        ({"tenants": {"a b": {"keys": ["k"]}}}, "tenant names"),
        ({"tenants": {"a": {}}}, "has no keys"),
        ({"tenants": {"a": {"key_sha256": ["xyz"]}}}, "64 hex digits"),
        ({"tenants": {"a": {"keys": ["k"], "tokens_per_minute": -1}}}, ">= 0"),
        (["k"], "must be"),
    ],
)
def test_bad_keys_files_are_refused_without_echoing_a_key(tmp_path, doc, error):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(KeysConfigError, match=error) as exc:
        ApiKeys.build(keys_file=path)
    assert "'k'" not in str(exc.value)


def test_tenants_never_share_a_block_key_and_a_client_salt_only_narrows():
    acme, beta = Tenant("acme"), Tenant("beta")
    prompt = list(range(64))

    def keys(salt: str) -> list:
        return chain_block_keys(prompt, 16, root_key("model-fp", salt))

    # beta sending acme's derived salt still lands in beta's namespace
    for beta_salt in ("", acme.cache_salt(""), "x"):
        assert not set(keys(acme.cache_salt(""))) & set(keys(beta.cache_salt(beta_salt)))
    assert keys(acme.cache_salt("")) == keys(acme.cache_salt(""))  # one tenant shares
    assert not set(keys(acme.cache_salt(""))) & set(keys(acme.cache_salt("team-1")))
    assert acme.cache_salt("team-1").startswith(acme.cache_salt("") + "/")


def test_request_and_token_buckets_refill_per_minute_per_tenant():
    limiter = RateLimiter()
    acme = Tenant("acme", requests_per_minute=2)
    beta = Tenant("beta", tokens_per_minute=100)
    assert [limiter.admit(acme, 0.0) for _ in range(3)] == [0.0, 0.0, 30.0]
    assert limiter.admit(acme, 29.0) == pytest.approx(1.0)
    assert limiter.admit(acme, 30.0) == 0.0
    assert limiter.admit(beta, 0.0) == 0.0
    limiter.charge_tokens(beta, 150, 0.0)  # level 100 - 150 = -50: needs 51 tokens back
    assert limiter.admit(beta, 0.0) == pytest.approx(30.6)
    assert limiter.admit(beta, 30.6) == 0.0
    assert limiter.admit(Tenant("free"), 0.0) == 0.0  # no limits: never refused


class FakeRouter:
    """Streams two chunks, the last with usage; records the salt it was given."""

    def __init__(self) -> None:
        self.salts: list[str] = []

    async def generate(self, req, deadline_s, **kwargs):
        self.salts.append(req.cache_salt)
        yield Chunk("r", text="a")
        usage = Usage(prompt_tokens=40, completion_tokens=20, cached_tokens=16)
        yield Chunk("r", text="b", usage=usage)


def _drain(gate, tenant, router, salt=""):
    async def run():
        req = GenerateInput(prompt="hi", cache_salt=salt or None)
        return [c.text async for c in gate.generate(tenant, router, req, None)]

    return asyncio.run(run())


def test_the_gate_scopes_salts_charges_tokens_and_answers_429_with_retry_after():
    now = [0.0]
    keys = ApiKeys.build(keys_env="acme=sk-a,beta=sk-b", tokens_per_minute=100)
    gate, router = TenantGate(keys, clock=lambda: now[0]), FakeRouter()
    acme, beta = gate.authenticate("Bearer sk-a"), gate.authenticate("Bearer sk-b")
    assert _drain(gate, acme, router, salt="team") == ["a", "b"]  # 60 tokens charged
    assert _drain(gate, acme, router) == ["a", "b"]  # 40 left: admitted, goes to -20
    with pytest.raises(RateLimited) as refused:
        _drain(gate, acme, router)
    assert refused.value.retry_after_s == 13  # (1 + 20) tokens at 100/min = 12.6 s
    assert http_status(refused.value) == (429, "rate_limit_error")
    assert grpc_status(refused.value) == "RESOURCE_EXHAUSTED"
    assert _drain(gate, beta, router) == ["a", "b"]  # the other tenant is unaffected
    assert router.salts == [acme.cache_salt("team"), acme.cache_salt(""), beta.cache_salt("")]
    now[0] = 12.6
    assert _drain(gate, acme, router) == ["a", "b"]


def test_a_refused_key_is_never_logged():
    gate = TenantGate(ApiKeys.build(keys_env="acme=sk-live-secret"))
    with structlog.testing.capture_logs() as logs, pytest.raises(Unauthenticated):
        gate.authenticate("Bearer sk-live-secre")
    assert logs and "sk-live" not in repr(logs)
