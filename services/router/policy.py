"""Routing policy: pure functions of plain data (no grpc, no Redis, no clock).

The same functions run in the router and in tests or a simulator. Inputs are snapshots the
router assembles per request; outputs are small frozen plans.

Decode worker score (higher wins)::

    score(w) = overlap_weight * cached_tokens(w) / prompt_tokens
             - load_weight    * inflight(w) / capacity(w)

``cached_tokens(w)`` is the prompt prefix held in ``w``'s own KV cache (its published HBM
blocks, or the prefixes the router sent it), which its local prefill reuses. The first term is in [0, 1] (the prompt share
that need not be recomputed), the second is the worker's load ratio (can exceed 1). Ties go
to the less loaded worker, then the smaller worker id, so decisions are deterministic.

Prefill worker score: the same formula, where ``cached_tokens`` is what its node's KV store
already holds (the prefill worker loads those blocks instead of computing them).

Conditional disaggregation: prefill on the decode worker (no remote prefill) when there is
no prefill worker, or when the part of the prompt the decode worker does not hold is shorter
than ``threshold_tokens`` (a short suffix costs less to compute in place than a handoff).

Admission: reject at once (never queue forever) when ``max_inflight`` requests are already
admitted, or when the predicted time to first token exceeds the caller's deadline::

    predicted_ttft_s = (queued_prefill_tokens(target) + uncached_tokens) / prefill_tokens_per_s
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerLoad:
    """One worker as the policy sees it for one request."""

    worker_id: str
    num_inflight: int  # requests assigned and not finished (router's count, or reported)
    capacity: int  # num_inflight at which the load ratio is 1
    cached_tokens: int = 0  # prompt prefix this worker reads without a remote fetch
    queued_prefill_tokens: int = 0  # prompt tokens waiting to be computed there

    @property
    def load_ratio(self) -> float:
        return self.num_inflight / max(1, self.capacity)


@dataclass(frozen=True)
class Weights:
    overlap: float = 1.0
    load: float = 1.0


@dataclass(frozen=True)
class Choice:
    worker_id: str
    score: float
    cached_tokens: int


def score(worker: WorkerLoad, num_prompt_tokens: int, weights: Weights) -> float:
    """The documented score: cached prompt share minus load ratio, each weighted."""
    cached = min(worker.cached_tokens, num_prompt_tokens)
    overlap = cached / num_prompt_tokens if num_prompt_tokens > 0 else 0.0
    return weights.overlap * overlap - weights.load * worker.load_ratio


def choose_worker(
    workers: Iterable[WorkerLoad],
    num_prompt_tokens: int,
    weights: Weights,
    exclude: Iterable[str] = (),
) -> Choice | None:
    """The best-scoring worker not in ``exclude``; None when there is none."""
    skip = set(exclude)
    best: tuple[tuple[float, float, str], WorkerLoad] | None = None
    for w in workers:
        if w.worker_id in skip:
            continue
        s = score(w, num_prompt_tokens, weights)
        # max score, then min load, then min id: negate the latter two for one max().
        rank = (s, -w.load_ratio, _neg(w.worker_id))
        if best is None or rank > best[0]:
            best = (rank, w)
    if best is None:
        return None
    w = best[1]
    return Choice(w.worker_id, best[0][0], min(w.cached_tokens, num_prompt_tokens))


def _neg(text: str) -> tuple[int, ...]:
    """A key that orders strings in reverse, so max() prefers the smallest id."""
    return tuple(-ord(c) for c in text) + (1,)


class PrefillMode(enum.Enum):
    LOCAL = "local"  # the decode worker prefills (colocated)
    REMOTE = "remote"  # a prefill worker prefills, then hands the KV over


@dataclass(frozen=True)
class Disaggregation:
    mode: PrefillMode
    uncached_tokens: int  # what the decode worker would have to compute itself
    reason: str
    reason_class: str = ""  # closed set, for metric labels: see REASON_CLASSES


# The reasons' classes (metric label values; ``reason`` itself carries the numbers).
NO_PREFILL_WORKERS = "no_prefill_workers"
SHORT_SUFFIX = "uncached_below_threshold"
LONG_SUFFIX = "uncached_above_threshold"
PREFILL_FAILED = "prefill_failed"  # set by the router when every remote prefill failed
REASON_CLASSES = (NO_PREFILL_WORKERS, SHORT_SUFFIX, LONG_SUFFIX, PREFILL_FAILED)


def decide_disaggregation(
    num_prompt_tokens: int,
    decode_cached_tokens: int,
    threshold_tokens: int,
    num_prefill_workers: int,
) -> Disaggregation:
    """Skip the remote prefill when it cannot pay off (see the module docstring)."""
    uncached = max(0, num_prompt_tokens - min(decode_cached_tokens, num_prompt_tokens))
    if num_prefill_workers == 0:
        return Disaggregation(
            PrefillMode.LOCAL, uncached, "colocated: no prefill workers", NO_PREFILL_WORKERS
        )
    if uncached < threshold_tokens:
        held = (
            f"; decode worker holds {decode_cached_tokens} tokens" if decode_cached_tokens else ""
        )
        return Disaggregation(
            PrefillMode.LOCAL,
            uncached,
            f"uncached suffix {uncached} < threshold {threshold_tokens}{held}",
            SHORT_SUFFIX,
        )
    return Disaggregation(
        PrefillMode.REMOTE,
        uncached,
        f"uncached suffix {uncached} >= threshold {threshold_tokens}",
        LONG_SUFFIX,
    )


@dataclass(frozen=True)
class RoutePlan:
    num_prompt_tokens: int
    decode: Choice
    prefill: Choice | None  # None: prefill on the decode worker
    disaggregation: Disaggregation

    @property
    def uncached_tokens(self) -> int:
        """Prompt tokens that will be computed, wherever that happens."""
        if self.prefill is None:
            return self.disaggregation.uncached_tokens
        return self.num_prompt_tokens - self.prefill.cached_tokens


def plan_route(
    decode_workers: Sequence[WorkerLoad],
    prefill_workers: Sequence[WorkerLoad],
    num_prompt_tokens: int,
    weights: Weights,
    threshold_tokens: int,
    exclude_prefill: Iterable[str] = (),
) -> RoutePlan | None:
    """Pick the decode worker, then whether and where to prefill. None: no decode worker."""
    decode = choose_worker(decode_workers, num_prompt_tokens, weights)
    if decode is None:
        return None
    candidates = [w for w in prefill_workers if w.worker_id not in set(exclude_prefill)]
    dis = decide_disaggregation(
        num_prompt_tokens, decode.cached_tokens, threshold_tokens, len(candidates)
    )
    prefill = None
    if dis.mode is PrefillMode.REMOTE:
        prefill = choose_worker(candidates, num_prompt_tokens, weights)
    return RoutePlan(num_prompt_tokens, decode, prefill, dis)


# ---- admission ----


@dataclass(frozen=True)
class Admission:
    admitted: bool
    reason: str = ""
    retry_after_s: int = 0  # whole seconds, as HTTP Retry-After wants
    reason_class: str = ""  # "queue_full" | "deadline" (metric label) when rejected


def predict_ttft_s(queued_prefill_tokens: int, uncached_tokens: int, tokens_per_s: float) -> float:
    return (queued_prefill_tokens + uncached_tokens) / tokens_per_s


def admit(
    num_inflight: int,
    max_inflight: int,
    predicted_ttft_s: float,
    deadline_s: float,
    queued_prefill_tokens: int,
    tokens_per_s: float,
) -> Admission:
    """Admit, or reject with a reason and a Retry-After (the queue's predicted drain time)."""
    drain_s = max(1, math.ceil(queued_prefill_tokens / tokens_per_s))
    if num_inflight >= max_inflight:
        return Admission(
            False, f"router is full ({num_inflight}/{max_inflight} requests)", drain_s, "queue_full"
        )
    if predicted_ttft_s > deadline_s:
        return Admission(
            False,
            f"predicted time to first token {predicted_ttft_s:.2f}s exceeds the deadline "
            f"{deadline_s:.2f}s",
            drain_s,
            "deadline",
        )
    return Admission(True)
