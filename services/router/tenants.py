"""Tenants: API keys, cache namespaces and rate limits. Pure data and arithmetic: no grpc, no
clock (callers pass ``now_s``), no I/O beyond reading the keys file once.

- **Keys**: each API key maps to one tenant. Only SHA-256 digests of the keys are held; the
  presented key's digest is compared with every entry in constant time (``hmac.compare_digest``,
  no early exit), so neither timing nor a memory dump gives a key away. Keys never reach a log.
- **Cache namespace**: the router derives each tenant's cache salt from its name; a client's
  ``cache_salt`` is appended to it, so it can only split the tenant's own namespace further.
  Two tenants' block keys differ from the first block on (the chain's root is the salt).
- **Rate limits**: two token buckets per tenant, requests per minute and tokens per minute
  (prompt + completion, charged when the request ends). A request is admitted while the
  request bucket holds one request and the token bucket is not in debt; otherwise the caller
  is told how long to wait.

Keys file (JSON)::

    {"tenants": {
        "acme": {"keys": ["sk-acme-1"], "requests_per_minute": 600, "tokens_per_minute": 200000},
        "beta": {"key_sha256": ["<hex digest>"]}
    }}

Environment (``PDSERVE_ROUTER_API_KEYS``): ``tenant=key,tenant=key`` with the default limits.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

OPEN_TENANT = "anonymous"  # the one tenant of a router with no keys configured
_BEARER = "Bearer "


@dataclass(frozen=True)
class Tenant:
    name: str
    requests_per_minute: int = 0  # 0: unlimited
    tokens_per_minute: int = 0  # 0: unlimited
    isolated: bool = True  # False only for the open router's single tenant

    def cache_salt(self, client_salt: str) -> str:
        """The salt the workers see: the tenant's namespace, narrowed by the client's salt.

        The root is a fixed-length digest, so no client salt of one tenant can spell another
        tenant's root."""
        if not self.isolated:
            return client_salt
        root = hashlib.sha256(f"pdserve-tenant\x00{self.name}".encode()).hexdigest()
        return f"{root}/{client_salt}" if client_salt else root


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeysConfigError(ValueError):
    """A malformed keys file or environment entry (the message never contains a key)."""


@dataclass(frozen=True)
class ApiKeys:
    """Key digest → tenant. ``is_open``: no keys configured, every caller is :data:`OPEN_TENANT`."""

    entries: tuple[tuple[bytes, Tenant], ...] = ()

    @property
    def is_open(self) -> bool:
        return not self.entries

    @property
    def tenants(self) -> list[Tenant]:
        return sorted({t.name: t for _, t in self.entries}.values(), key=lambda t: t.name)

    def tenant_for(self, authorization: str | None) -> Tenant | None:
        """The tenant of an ``authorization`` header value, None when it names none."""
        if self.is_open:
            return Tenant(OPEN_TENANT, isolated=False)
        if authorization is None or not authorization.startswith(_BEARER):
            return None
        presented = key_digest(authorization[len(_BEARER) :].strip())
        found = None
        for digest, tenant in self.entries:  # every entry, whatever matched: constant time
            if hmac.compare_digest(presented, digest):
                found = tenant
        return found

    @classmethod
    def build(
        cls,
        *,
        keys_file: Path | None = None,
        keys_env: str | None = None,
        single_key: str | None = None,
        requests_per_minute: int = 0,
        tokens_per_minute: int = 0,
    ) -> ApiKeys:
        """From the keys file, the ``tenant=key,...`` variable and the single legacy key
        (tenant ``default``), with these limits unless the file sets a tenant's own."""
        defaults = {
            "requests_per_minute": requests_per_minute,
            "tokens_per_minute": tokens_per_minute,
        }
        entries: list[tuple[bytes, Tenant]] = []
        if keys_file is not None:
            entries += _from_file(json.loads(keys_file.read_text()), defaults)
        if keys_env:
            entries += _from_env(keys_env, defaults)
        if single_key:
            entries.append((key_digest(single_key), Tenant("default", **defaults)))
        digests = [d for d, _ in entries]
        if len(set(digests)) != len(digests):
            raise KeysConfigError("an API key is listed twice")
        return cls(tuple(entries))


def _from_file(doc: object, defaults: dict[str, int]) -> Iterable[tuple[bytes, Tenant]]:
    tenants = doc.get("tenants") if isinstance(doc, dict) else None
    if not isinstance(tenants, dict):
        raise KeysConfigError('the keys file must be {"tenants": {name: {...}}}')
    for name, spec in tenants.items():
        if not isinstance(spec, dict):
            raise KeysConfigError(f"tenant {name!r}: expected an object")
        limits = {k: int(spec.get(k, v)) for k, v in defaults.items()}
        if min(limits.values()) < 0:
            raise KeysConfigError(f"tenant {name!r}: limits must be >= 0")
        tenant = Tenant(_tenant_name(name), **limits)
        digests = [key_digest(k) for k in spec.get("keys", [])]
        digests += [_hex_digest(name, h) for h in spec.get("key_sha256", [])]
        if not digests:
            raise KeysConfigError(f"tenant {name!r} has no keys")
        yield from ((d, tenant) for d in digests)


def _from_env(text: str, defaults: dict[str, int]) -> Iterable[tuple[bytes, Tenant]]:
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, key = item.partition("=")
        if not sep or not key:
            raise KeysConfigError("PDSERVE_ROUTER_API_KEYS wants tenant=key[,tenant=key...]")
        yield key_digest(key), Tenant(_tenant_name(name), **defaults)


def _tenant_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise KeysConfigError(f"tenant names are letters, digits, '-', '_' or '.' (got {name!r})")
    return name


def _hex_digest(tenant: str, text: str) -> bytes:
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise KeysConfigError(f"tenant {tenant!r}: key_sha256 entries are 64 hex digits")
    return digest


# ---- rate limits --------------------------------------------------------------------------


@dataclass
class TokenBucket:
    """``capacity`` units, refilled at ``capacity`` per minute; the level may go negative
    (a debt: tokens are charged after the fact)."""

    capacity: float
    level: float = math.nan
    updated_s: float = math.nan

    def refill(self, now_s: float) -> None:
        if math.isnan(self.level):
            self.level, self.updated_s = self.capacity, now_s
        elapsed = max(0.0, now_s - self.updated_s)
        self.level = min(self.capacity, self.level + elapsed * self.capacity / 60.0)
        self.updated_s = now_s

    def wait_s(self, need: float) -> float:
        """Seconds until the level reaches ``need`` (0 if it has)."""
        return max(0.0, (need - self.level) * 60.0 / self.capacity)


@dataclass
class RateLimiter:
    """Per-tenant request and token buckets (tenants with a limit of 0 are never limited)."""

    _requests: dict[str, TokenBucket] = field(default_factory=dict)
    _tokens: dict[str, TokenBucket] = field(default_factory=dict)

    def _buckets(self, tenant: Tenant, now_s: float) -> list[tuple[TokenBucket, float]]:
        """(bucket, units a request needs in it) for each limit the tenant has."""
        out = []
        if tenant.requests_per_minute:
            b = self._requests.setdefault(tenant.name, TokenBucket(tenant.requests_per_minute))
            out.append((b, 1.0))
        if tenant.tokens_per_minute:
            b = self._tokens.setdefault(tenant.name, TokenBucket(tenant.tokens_per_minute))
            out.append((b, 1.0))  # admitted while at least one token is left
        for b, _ in out:
            b.refill(now_s)
        return out

    def admit(self, tenant: Tenant, now_s: float) -> float:
        """0.0 and one request taken, or the seconds to wait (nothing taken)."""
        buckets = self._buckets(tenant, now_s)
        wait_s = max((b.wait_s(need) for b, need in buckets), default=0.0)
        if wait_s > 0:
            return wait_s
        if tenant.requests_per_minute:
            self._requests[tenant.name].level -= 1.0
        return 0.0

    def charge_tokens(self, tenant: Tenant, num_tokens: int, now_s: float) -> None:
        if tenant.tokens_per_minute and num_tokens > 0:
            bucket = self._tokens.setdefault(tenant.name, TokenBucket(tenant.tokens_per_minute))
            bucket.refill(now_s)
            bucket.level -= num_tokens
