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

Conditional disaggregation (``decide_disaggregation``): prefill on the decode worker when
there is no prefill worker, or when the part of the prompt the decode worker does not hold is
shorter than ``threshold_tokens`` (a short suffix costs less to compute in place than a
handoff). Otherwise, under the ``cost`` policy, predict the time to first token both ways from
what the workers report (``CostModel`` holds the priors used until they have)::

    remote = prefill step fixed cost + (prefill queue + uncached) / prefill rate
             + handoff_s + uncached * handoff_s_per_token
    local  = steps * (decode step + prompt step fixed cost) + (decode queue + uncached) / rate
    steps  = ceil((decode queue + uncached) / chunk)   (1 when nothing decodes there),
    chunk  = the decode worker's own prompt budget (``StepCosts.step_budget``: its step target,
             grown to drain its queue in time), from the costs and settings it reports

and take the faster. Local is ruled out when it would push the running streams' time per
output token past ``tpot_slo_s``: their time per token is an average over their whole output,
so the local prefill's added time spreads over the shortest running output (the per-step rule
when the router knows no output lengths). The ``threshold`` policy disaggregates every prompt
whose uncached part reaches the threshold (the static rule).

Admission: reject at once (never queue forever) when ``max_inflight`` requests are already
admitted, or when the predicted time to first token exceeds the caller's deadline::

    predicted_ttft_s = (queued_prefill_tokens(target) + uncached_tokens) / prefill_tokens_per_s
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pdserve.engine.step_costs import StepCosts


@dataclass(frozen=True)
class WorkerLoad:
    """One worker as the policy sees it for one request."""

    worker_id: str
    num_inflight: int  # requests assigned and not finished (router's count, or reported)
    capacity: int  # num_inflight at which the load ratio is 1
    cached_tokens: int = 0  # prompt prefix this worker reads without a remote fetch
    queued_prefill_tokens: int = 0  # prompt tokens waiting to be computed there
    num_running: int = 0  # sequences in its batch (reported)
    step_s: float = 0.0  # its decode-only step time (reported; 0: not yet known)
    prompt_tokens_per_s: float = 0.0  # its prompt throughput (reported; 0: not yet known)
    prompt_step_s: float = 0.0  # what a step carrying prompt tokens pays on top (reported)
    # Its prompt chunking (reported): the step target (0: none) and the drain time of its
    # queued prompts; None: not reported, the CostModel's prior applies.
    target_step_s: float | None = None
    prompt_drain_s: float | None = None
    max_step_tokens: int | None = None  # its token budget per step (reported; None: the prior)
    min_output_tokens: int = 0  # shortest whole output among its running streams (0: unknown)

    @property
    def load_ratio(self) -> float:
        return self.num_inflight / max(1, self.capacity)


def worker_load(
    worker_id: str,
    report: Mapping[str, float],
    capacity: int,
    own_inflight: int = 0,
    own_queued_tokens: int = 0,
    cached_tokens: int = 0,
    min_output_tokens: int = 0,
) -> WorkerLoad:
    """A worker as the policy sees it, from its heartbeat ``report`` and the router's own
    counts for it (fresher than the last heartbeat, so the larger of the two wins). The one
    place a report becomes a WorkerLoad: the router and the simulator both call it."""

    def reported(name: str) -> float | None:
        value = report.get(name)
        return None if value is None else float(value)

    return WorkerLoad(
        worker_id=worker_id,
        num_inflight=max(own_inflight, int(report.get("running", 0) + report.get("waiting", 0))),
        capacity=capacity,
        cached_tokens=cached_tokens,
        queued_prefill_tokens=max(own_queued_tokens, int(report.get("pending_prompt_tokens", 0))),
        num_running=max(int(report.get("running", 0)), own_inflight),
        step_s=float(report.get("step_s", 0.0)),
        prompt_tokens_per_s=float(report.get("prompt_tokens_per_s", 0.0)),
        prompt_step_s=float(report.get("prompt_step_s", 0.0)),
        target_step_s=reported("target_step_s"),
        prompt_drain_s=reported("prompt_drain_s"),
        max_step_tokens=int(report["max_num_batched_tokens"])
        if report.get("max_num_batched_tokens")
        else None,
        min_output_tokens=min_output_tokens,
    )


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


class DisaggregationPolicy(enum.Enum):
    COST = "cost"  # the faster predicted time to first token, within the decode SLO
    THRESHOLD = "threshold"  # remote whenever the uncached part reaches the threshold


@dataclass(frozen=True)
class CostModel:
    """The policy's priors and SLO. A worker's own report replaces a prior once it has one."""

    prefill_tokens_per_s: float = 2000.0  # prompt throughput of a worker that reported none
    decode_step_s: float = 0.05  # decode-only step of a worker that reported none
    max_chunk_tokens: int = 512  # a decode worker's token budget per step, until it reports its own
    target_step_s: float = 0.1  # a decode worker's step target, until it reports its own
    prompt_drain_s: float | None = 0.5  # its time to drain queued prompts, likewise
    handoff_s: float = 0.02  # fixed cost of a handoff (decode RPC, last layer's transfer)
    handoff_s_per_token: float = 0.0  # transfer time per prompt token the pipeline cannot hide
    tpot_slo_s: float = 0.15  # the decode step running streams must keep


@dataclass(frozen=True)
class Disaggregation:
    mode: PrefillMode
    uncached_tokens: int  # what the decode worker would have to compute itself
    reason: str
    reason_class: str = ""  # closed set, for metric labels: see REASON_CLASSES
    predicted_local_ttft_s: float | None = None  # None: not predicted (no cost comparison)
    predicted_remote_ttft_s: float | None = None


# The reasons' classes (metric label values; ``reason`` itself carries the numbers).
NO_PREFILL_WORKERS = "no_prefill_workers"
SHORT_SUFFIX = "uncached_below_threshold"
LONG_SUFFIX = "uncached_above_threshold"  # the threshold policy's remote decision
REMOTE_FASTER = "remote_faster"
LOCAL_FASTER = "local_faster"
LOCAL_BREAKS_TPOT = "local_breaks_tpot_slo"
PREFILL_FAILED = "prefill_failed"  # set by the router when every remote prefill failed
REASON_CLASSES = (
    NO_PREFILL_WORKERS,
    SHORT_SUFFIX,
    LONG_SUFFIX,
    REMOTE_FASTER,
    LOCAL_FASTER,
    LOCAL_BREAKS_TPOT,
    PREFILL_FAILED,
)


def _step_costs(worker: WorkerLoad, costs: CostModel) -> StepCosts:
    rate = worker.prompt_tokens_per_s or costs.prefill_tokens_per_s
    return StepCosts(
        base_step_s=worker.step_s or costs.decode_step_s,
        prompt_step_s=worker.prompt_step_s,
        prompt_token_s=1.0 / rate,
    )


def predict_remote_ttft_s(prefill: WorkerLoad, uncached_tokens: int, costs: CostModel) -> float:
    """Queue and compute on the prefill worker, then the part of the handoff left exposed."""
    rate = prefill.prompt_tokens_per_s or costs.prefill_tokens_per_s
    compute_s = prefill.prompt_step_s + (prefill.queued_prefill_tokens + uncached_tokens) / rate
    return compute_s + costs.handoff_s + uncached_tokens * costs.handoff_s_per_token


def _max_step_tokens(decode: WorkerLoad, costs: CostModel) -> int:
    """The decode worker's token budget per step: its own report, else the prior."""
    return decode.max_step_tokens or costs.max_chunk_tokens


def local_chunk_tokens(decode: WorkerLoad, uncached_tokens: int, costs: CostModel) -> int:
    """The prompt tokens per step the decode worker would give its queue plus this prompt:
    the engine's own budget (``StepCosts.step_budget``) from what the worker reports."""
    target = costs.target_step_s if decode.target_step_s is None else decode.target_step_s
    drain = costs.prompt_drain_s if decode.prompt_drain_s is None else decode.prompt_drain_s
    max_tokens = _max_step_tokens(decode, costs)
    budget = _step_costs(decode, costs).step_budget(
        target or None,
        drain or None,
        max_tokens,
        decode.queued_prefill_tokens + uncached_tokens,
    )
    return max_tokens if budget is None else budget


def _local_prefill(
    decode: WorkerLoad, uncached_tokens: int, costs: CostModel
) -> tuple[StepCosts, int, int]:
    """The decode worker's step costs, the prompt work a local prefill joins (its queue and
    this prompt) and the steps that work takes: chunked next to running decodes, else in
    steps as large as the worker's token budget."""
    step = _step_costs(decode, costs)
    work = decode.queued_prefill_tokens + uncached_tokens
    if not decode.num_running:
        return step, work, math.ceil(work / _max_step_tokens(decode, costs))
    return step, work, math.ceil(work / local_chunk_tokens(decode, uncached_tokens, costs))


def predict_local_ttft_s(decode: WorkerLoad, uncached_tokens: int, costs: CostModel) -> float:
    """The decode worker's queued prompts and this one, chunked next to its running decodes
    (in one step when nothing decodes there)."""
    step, work, steps = _local_prefill(decode, uncached_tokens, costs)
    return steps * (step.base_step_s + step.prompt_step_s) + work * step.prompt_token_s


def local_step_s(decode: WorkerLoad, uncached_tokens: int, costs: CostModel) -> float:
    """The step the decode worker's running streams see while it prefills locally."""
    step = _step_costs(decode, costs)
    chunk = min(local_chunk_tokens(decode, uncached_tokens, costs), uncached_tokens)
    return step.base_step_s + step.prompt_step_s + chunk * step.prompt_token_s


def local_tpot_s(decode: WorkerLoad, uncached_tokens: int, costs: CostModel) -> float:
    """The time per output token of the decode worker's shortest running stream once it has
    also prefilled its queue and this prompt: the added time spread over that stream's output.
    Without output lengths, the step it makes while prefilling."""
    if decode.min_output_tokens < 2:
        return local_step_s(decode, uncached_tokens, costs)
    step, work, steps = _local_prefill(decode, uncached_tokens, costs)
    added_s = steps * step.prompt_step_s + work * step.prompt_token_s
    return step.base_step_s + added_s / (decode.min_output_tokens - 1)


def decide_disaggregation(
    num_prompt_tokens: int,
    decode: WorkerLoad,
    prefill: WorkerLoad | None,
    threshold_tokens: int,
    costs: CostModel | None = None,
) -> Disaggregation:
    """Where to prefill (see the module docstring). ``prefill``: the best prefill candidate,
    None when there is none; ``costs`` None selects the threshold policy."""
    uncached = max(0, num_prompt_tokens - min(decode.cached_tokens, num_prompt_tokens))
    if prefill is None:
        return Disaggregation(
            PrefillMode.LOCAL, uncached, "colocated: no prefill workers", NO_PREFILL_WORKERS
        )
    if uncached < threshold_tokens:
        held = (
            f"; decode worker holds {decode.cached_tokens} tokens" if decode.cached_tokens else ""
        )
        return Disaggregation(
            PrefillMode.LOCAL,
            uncached,
            f"uncached suffix {uncached} < threshold {threshold_tokens}{held}",
            SHORT_SUFFIX,
        )
    if costs is None:
        return Disaggregation(
            PrefillMode.REMOTE,
            uncached,
            f"uncached suffix {uncached} >= threshold {threshold_tokens}",
            LONG_SUFFIX,
        )
    return _compare_costs(num_prompt_tokens, decode, prefill, uncached, costs)


def _compare_costs(
    num_prompt_tokens: int,
    decode: WorkerLoad,
    prefill: WorkerLoad,
    uncached: int,
    costs: CostModel,
) -> Disaggregation:
    remote_uncached = num_prompt_tokens - min(prefill.cached_tokens, num_prompt_tokens)
    remote_s = predict_remote_ttft_s(prefill, remote_uncached, costs)
    local_s = predict_local_ttft_s(decode, uncached, costs)
    both = f"predicted TTFT local {local_s:.3f}s, remote {remote_s:.3f}s"
    queues = (
        f"prefill queue {prefill.queued_prefill_tokens} tokens, "
        f"decode queue {decode.queued_prefill_tokens} tokens, {decode.num_running} running"
    )
    if decode.num_running and local_tpot_s(decode, uncached, costs) > costs.tpot_slo_s:
        mode, why, cls = PrefillMode.REMOTE, "local prefill breaks the TPOT SLO", LOCAL_BREAKS_TPOT
    elif remote_s < local_s:
        mode, why, cls = PrefillMode.REMOTE, "remote is faster", REMOTE_FASTER
    else:
        mode, why, cls = PrefillMode.LOCAL, "local is faster", LOCAL_FASTER
    return Disaggregation(mode, uncached, f"{why}: {both} ({queues})", cls, local_s, remote_s)


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
    costs: CostModel | None = None,
) -> RoutePlan | None:
    """Pick the decode worker, the best prefill candidate, then whether to use it (``costs``
    None: the threshold policy). None: no decode worker."""
    decode = choose_worker(decode_workers, num_prompt_tokens, weights)
    if decode is None:
        return None
    skip = set(exclude_prefill)
    candidates = [w for w in prefill_workers if w.worker_id not in skip]
    best = choose_worker(candidates, num_prompt_tokens, weights)
    decode_load = next(w for w in decode_workers if w.worker_id == decode.worker_id)
    prefill_load = next((w for w in candidates if best and w.worker_id == best.worker_id), None)
    dis = decide_disaggregation(
        num_prompt_tokens, decode_load, prefill_load, threshold_tokens, costs
    )
    prefill = best if dis.mode is PrefillMode.REMOTE else None
    return RoutePlan(num_prompt_tokens, decode, prefill, dis)


# ---- admission ----


@dataclass(frozen=True)
class Admission:
    admitted: bool
    reason: str = ""
    retry_after_s: int = 0  # whole seconds, as HTTP Retry-After wants
    reason_class: str = ""  # "queue_full" | "deadline" (metric label) when rejected


_RATE_EWMA_ALPHA = 0.2  # weight of the newest observation
_MIN_TOKENS_FOR_RATE = 64  # shorter prefills are dominated by fixed costs


def observe_prefill_rate(tokens_per_s: float, num_tokens: int, elapsed_s: float) -> float:
    """The router's prefill-rate prior after one remote prefill of ``num_tokens`` that took
    ``elapsed_s`` (an exponentially weighted average; short prefills leave it alone)."""
    if num_tokens < _MIN_TOKENS_FOR_RATE or elapsed_s <= 0:
        return tokens_per_s
    return tokens_per_s + _RATE_EWMA_ALPHA * (num_tokens / elapsed_s - tokens_per_s)


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
