"""Who calls the router and what they may do: API key → tenant, rate limit, cache namespace,
usage. The edges (server.py for gRPC, openai_api.py for HTTP) call :meth:`TenantGate.authenticate`
with the ``authorization`` value and serve through :meth:`TenantGate.generate`.

Per request: authenticated (else Unauthenticated: UNAUTHENTICATED / 401) → rate-limited
(else RateLimited: RESOURCE_EXHAUSTED / 429 with Retry-After) → scoped (the request's
``cache_salt`` becomes the tenant's namespace, narrowed by what the client sent) → served by
the router → its tokens charged to the tenant's bucket and usage counters.

Nothing here logs a key: a refused call is logged with the reason only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Callable

import structlog

from pdserve import metrics
from pdserve.errors import Overloaded, Unauthenticated
from services.router.messages import Chunk, GenerateInput
from services.router.settings import RouterSettings
from services.router.tenants import ApiKeys, RateLimiter, Tenant

log = structlog.get_logger(__name__)


class RateLimited(Overloaded):
    """The tenant is over its requests or tokens per minute."""

    code = "rate_limit_exceeded"


def check_bearer(keys: ApiKeys, header: str | None) -> Tenant:
    """The tenant whose key ``header`` (``Bearer <key>``) carries; no keys configured: all pass."""
    tenant = keys.tenant_for(header)
    if tenant is None:
        log.info("router.unauthenticated", has_header=header is not None)
        raise Unauthenticated("missing or invalid bearer token (API key)")
    return tenant


class TenantGate:
    """The router's tenants: their keys, rate-limit buckets and usage counters."""

    def __init__(self, keys: ApiKeys, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.keys = keys
        self._limiter = RateLimiter()
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: RouterSettings) -> TenantGate:
        return cls(
            ApiKeys.build(
                keys_file=settings.api_keys_file,
                keys_env=settings.api_keys.get_secret_value() if settings.api_keys else None,
                single_key=settings.api_key,
                requests_per_minute=settings.tenant_requests_per_minute,
                tokens_per_minute=settings.tenant_tokens_per_minute,
            )
        )

    def authenticate(self, header: str | None) -> Tenant:
        return check_bearer(self.keys, header)

    def admit(self, tenant: Tenant) -> None:
        wait_s = self._limiter.admit(tenant, self._clock())
        if wait_s > 0:
            metrics.TENANT_REQUESTS.labels(tenant.name, "rate_limited").inc()
            raise RateLimited(
                f"tenant {tenant.name!r} is over its rate limit; retry in {wait_s:.1f}s",
                retry_after_s=max(1, math.ceil(wait_s)),
                reason_class="tenant_rate",
            )

    async def generate(
        self, tenant: Tenant, router, inp: GenerateInput, deadline_s, **kwargs
    ) -> AsyncIterator[Chunk]:
        """``router.generate`` for ``tenant``: admitted, in its cache namespace, metered."""
        self.admit(tenant)
        scoped = dataclasses.replace(
            inp, cache_salt=tenant.cache_salt(inp.cache_salt or "") or None
        )
        usage, outcome = None, "error"
        try:
            async with contextlib.aclosing(router.generate(scoped, deadline_s, **kwargs)) as s:
                async for chunk in s:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    yield chunk
            outcome = "ok"
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "cancelled"
            raise
        finally:
            self._account(tenant, usage, outcome)

    def _account(self, tenant: Tenant, usage, outcome: str) -> None:
        metrics.TENANT_REQUESTS.labels(tenant.name, outcome).inc()
        if usage is None:
            return
        metrics.TENANT_TOKENS.labels(tenant.name, "prompt").inc(usage.prompt_tokens)
        metrics.TENANT_TOKENS.labels(tenant.name, "cached").inc(usage.cached_tokens)
        metrics.TENANT_TOKENS.labels(tenant.name, "completion").inc(usage.completion_tokens)
        total = usage.prompt_tokens + usage.completion_tokens
        self._limiter.charge_tokens(tenant, total, self._clock())
