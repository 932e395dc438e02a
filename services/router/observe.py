"""What the router records about one request: spans' attributes, metrics and log lines.

One :class:`RequestObserver` per request, fed by ``Router.generate`` at each step::

    arrived → parsed → routed (once per plan; again after a failed prefill) → admitted
            → chunk … (first token: event + TTFT) → finished | failed | cancelled

Exactly one of ``finished`` / ``failed`` / ``cancelled`` is called, and it settles the
request's metrics: ``pdserve_requests_total`` and the end-to-end histogram count every
request that reached the router, with finish reason ``stop`` | ``length`` | ``abort`` (the
client left) | ``error``; route ``disaggregated`` | ``local`` | ``none`` (failed before a
route was chosen). A migration (the decode worker failed mid-stream, the request moved on)
is a ``pdserve.migration`` event on the root span and counts in
``pdserve_router_migrations_total{reason}``. No prompt or completion text is recorded
anywhere.
"""

from __future__ import annotations

import json
import time

import grpc
import structlog
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from pdserve import metrics
from pdserve.errors import InvalidRequest, Overloaded, PdserveError, grpc_status, http_status
from pdserve.telemetry import Attr, Event
from services.router import policy
from services.router.messages import Chunk, GenerateInput

log = structlog.get_logger(__name__)

ERROR_TYPE = "error.type"  # OpenTelemetry's general attribute for the class of a failure
ROUTER_QUEUE = "router_admitted"
MIGRATION_EVENT = "pdserve.migration"


def request_attributes(inp: GenerateInput, model_name: str) -> dict:
    """GenAI request attributes of the root span (what the caller asked for)."""
    params = inp.params
    attrs: dict = {
        Attr.OPERATION: inp.operation,
        Attr.SYSTEM: "pdserve",
        Attr.ROLE: "router",
        Attr.MODEL: model_name,  # a wrong name is refused; never echo the caller's
        Attr.MAX_TOKENS: params.max_tokens,
        Attr.TEMPERATURE: params.temperature,
        Attr.TOP_P: params.top_p,
    }
    if params.seed is not None:
        attrs[Attr.SEED] = params.seed
    return attrs


def route_label(plan: policy.RoutePlan | None) -> str:
    if plan is None:
        return "none"
    return "disaggregated" if plan.prefill is not None else "local"


def route_attributes(
    plan: policy.RoutePlan, scores: dict[str, dict[str, float]], reason_class: str, attempt: int
) -> dict:
    """The ``router.route`` span: the decision, why, and every candidate's score."""
    return {
        Attr.ROUTE: route_label(plan),
        Attr.ROUTE_REASON: plan.disaggregation.reason,
        "pdserve.route.reason_class": reason_class,
        Attr.ROUTE_DECODE_WORKER: plan.decode.worker_id,
        Attr.ROUTE_PREFILL_WORKER: plan.prefill.worker_id if plan.prefill else "",
        Attr.ROUTE_SCORES: json.dumps(scores, sort_keys=True),
        Attr.PROMPT_TOKENS: plan.num_prompt_tokens,
        "pdserve.route.uncached_tokens": plan.uncached_tokens,
        "pdserve.route.attempt": attempt,
        **{
            f"pdserve.route.predicted_{way}_ttft_s": round(value, 4)
            for way, value in (
                ("local", plan.disaggregation.predicted_local_ttft_s),
                ("remote", plan.disaggregation.predicted_remote_ttft_s),
            )
            if value is not None
        },
    }


class RequestObserver:
    """Feeds one request's root span (``router.request``), metrics and log lines."""

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.arrived = time.monotonic()
        self.route = "none"
        self.num_output_tokens = 0
        self.first_token_at: float | None = None
        self.finish_reason: str | None = None
        self._settled = False

    def parsed(self, num_prompt_tokens: int, max_tokens: int) -> None:
        self.span.set_attributes({
            Attr.INPUT_TOKENS: num_prompt_tokens, Attr.MAX_TOKENS: max_tokens,
        })  # fmt: skip

    def routed(self, plan: policy.RoutePlan, reason_class: str) -> None:
        """The final decision (after any failed prefill): on the root span and counted."""
        self.route = route_label(plan)
        metrics.ROUTE_DECISIONS.labels(self.route, reason_class).inc()
        self.span.set_attributes({
            Attr.ROUTE: self.route, "pdserve.route.reason_class": reason_class,
            Attr.ROUTE_DECODE_WORKER: plan.decode.worker_id,
            Attr.ROUTE_PREFILL_WORKER: plan.prefill.worker_id if plan.prefill else "",
        })  # fmt: skip
        log.info(
            "router.routed", route=self.route, reason_class=reason_class,
            reason=plan.disaggregation.reason, decode_worker=plan.decode.worker_id,
            prefill_worker=plan.prefill.worker_id if plan.prefill else None,
            prompt_tokens=plan.num_prompt_tokens, uncached_tokens=plan.uncached_tokens,
        )  # fmt: skip

    def admitted(self, num_prompt_tokens: int) -> None:
        metrics.QUEUE_WAIT.labels(ROUTER_QUEUE).observe(time.monotonic() - self.arrived)
        metrics.PROMPT_TOKENS.inc(num_prompt_tokens)
        metrics.REQUEST_PROMPT_TOKENS.observe(num_prompt_tokens)

    def migrated(self, reason: str, from_worker: str, to_worker: str, num_tokens: int) -> None:
        """The decode worker failed (``reason``: a Failure value); the stream goes on."""
        metrics.ROUTER_MIGRATIONS.labels(reason).inc()
        self.span.add_event(MIGRATION_EVENT, {
            "pdserve.migration.reason": reason, "pdserve.migration.from_worker": from_worker,
            "pdserve.migration.to_worker": to_worker,
            "pdserve.migration.streamed_tokens": num_tokens,
        })  # fmt: skip
        log.warning("router.migrated", reason=reason, from_worker=from_worker,
                    to_worker=to_worker, streamed_tokens=num_tokens)  # fmt: skip

    def chunk(self, chunk: Chunk) -> None:
        n = len(chunk.token_ids)
        if n and self.first_token_at is None:
            self.first_token_at = time.monotonic()
            ttft_s = self.first_token_at - self.arrived
            self.span.add_event(Event.FIRST_TOKEN, {"pdserve.ttft_ms": round(ttft_s * 1000, 3)})
            metrics.TIME_TO_FIRST_TOKEN.labels(self.route).observe(ttft_s)
        self.num_output_tokens += n
        metrics.GENERATION_TOKENS.inc(n)
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason

    def finished(self) -> None:
        """The decode stream ended (normally: with a finish reason)."""
        self._settle(self.finish_reason or "stop")

    def failed(self, exc: PdserveError) -> None:
        status = grpc_status(exc)
        self.span.set_status(Status(StatusCode.ERROR, f"{status}: {exc.message}"))
        self.span.set_attributes({
            ERROR_TYPE: exc.code,
            Attr.RPC_STATUS: grpc.StatusCode[status].value[0],
            "http.response.status_code": http_status(exc)[0],
        })  # fmt: skip
        if isinstance(exc, Overloaded):
            metrics.REJECTED_REQUESTS.labels(exc.reason_class or "queue_full").inc()
        elif isinstance(exc, InvalidRequest):
            metrics.REJECTED_REQUESTS.labels("invalid").inc()
        log.warning("router.failed", status=status, error=exc.message, route=self.route)
        self._settle("error")

    def cancelled(self) -> None:
        """The client went away (or its stream was closed) before the end."""
        log.info("router.cancelled", output_tokens=self.num_output_tokens, route=self.route)
        self._settle("abort")

    def _settle(self, finish_reason: str) -> None:
        if self._settled:
            return
        self._settled = True
        e2e_s = time.monotonic() - self.arrived
        n = self.num_output_tokens
        self.span.set_attributes({
            Attr.FINISH_REASONS: [finish_reason], Attr.OUTPUT_TOKENS: n,
        })  # fmt: skip
        self.span.add_event(Event.FINISH, {"pdserve.finish_reason": finish_reason})
        metrics.REQUESTS.labels(finish_reason, self.route).inc()
        metrics.E2E_REQUEST_LATENCY.labels(self.route, finish_reason).observe(e2e_s)
        if finish_reason != "error":
            metrics.REQUEST_GENERATION_TOKENS.observe(n)
        ttft_s = None if self.first_token_at is None else self.first_token_at - self.arrived
        if ttft_s is not None and n > 1:
            metrics.TIME_PER_OUTPUT_TOKEN.labels(self.route).observe((e2e_s - ttft_s) / (n - 1))
        if finish_reason != "error":
            log.info(
                "router.finished", finish_reason=finish_reason, route=self.route,
                output_tokens=n, e2e_ms=round(e2e_s * 1000, 1),
                ttft_ms=None if ttft_s is None else round(ttft_s * 1000, 1),
            )  # fmt: skip
