"""Discrete-event simulation of a pdserve cluster: N prefill and M decode replicas (or M
colocated ones when N is 0).

What runs unchanged: every replica's batches are formed by the engine's own ``Scheduler`` and
``BlockManager`` (token budget, chunked prefill, prefix cache, preemption), and every routing,
conditional-disaggregation and admission decision is made by the router's policy functions
(``services.router.policy``) fed the snapshots the real router builds: its own in-flight and
queued-token counts, the workers' reported load (refreshed every ``staleness_s``), and the
prefix each worker holds. What is charged instead of run: a step's duration and the KV
handoff (see :mod:`pdserve.sim.costs`).

A request's life mirrors the real path: router (admission, plan) → after ``dispatch_s`` the
prefill worker (a one-token request) or the decode worker (local prefill) → for a remote
prefill, the KV lands in the decode worker's prefix cache when the pipelined handoff finishes
and the request joins decode with the prefill's token, which the decode worker streams as it
admits the request, before its first step (``LLMEngine.emit_first_token``).

Fast-forward: when a replica's batch is pure decode (nothing waiting, every running sequence
one token behind, the whole batch within the token budget and enough free blocks), the
scheduler's next steps are known: each running sequence gains one token per step until the
first one finishes. Those steps are costed in one vectorized call and applied through the same
BlockManager calls a step makes; a request arriving at the replica cuts the stretch after the
step in flight. ``fast_forward=False`` steps one by one; a test checks both agree exactly.
"""

from __future__ import annotations

import gc
import heapq
import itertools
from bisect import bisect_right
from dataclasses import asdict, dataclass, field

import numpy as np

from pdserve.engine.block_hash import BlockKey
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.scheduler import Scheduler, SchedulerPlan
from pdserve.engine.sequence import FinishReason, Sequence
from pdserve.engine.step_costs import StepCosts
from pdserve.engine.step_log import plan_totals
from pdserve.sim.costs import CostModel, StepShape
from pdserve.workload import result
from pdserve.workload.format import Request
from services.decode.settings import DecodeSettings
from services.router import admission, policy
from services.router.settings import RouterSettings

_ROOT = BlockKey(b"pdserve-sim")
_UNIQUE_TOKEN_BASE = 1 << 20  # request i's own tokens are this + i; prefix groups are below


def _no_hashing(parent: BlockKey, block_token_ids: list[int]) -> BlockKey:
    """The replicas' ``key_fn``, never called: every simulated sequence carries the keys of all
    the full blocks it can ever have (``_PromptKeys``), so the BlockManager hashes nothing."""
    raise AssertionError("a simulated sequence outgrew its precomputed block keys")


def _router_default(name: str):
    return RouterSettings.model_fields[name].default


def _decode_default(name: str):
    return DecodeSettings.engine_defaults[name]  # the decode role's engine defaults


@dataclass(frozen=True)
class SimConfig:
    """The cluster and the router's knobs; router defaults are the real router's defaults."""

    num_prefill: int
    num_decode: int
    slo: result.Slo = field(default_factory=result.Slo)
    threshold_tokens: int = _router_default("disagg_threshold_tokens")
    disaggregation_policy: str = _router_default("disaggregation_policy")  # cost | threshold
    tpot_slo_s: float = _router_default("tpot_slo_s")
    decode_step_s: float = _router_default("decode_step_s")
    handoff_s: float = _router_default("handoff_s")
    handoff_s_per_token: float = _router_default("handoff_s_per_token")
    prefill_tokens_per_s: float = _router_default("prefill_tokens_per_s")
    decode_target_step_s: float | None = _decode_default("target_step_s")
    decode_prompt_drain_s: float | None = _decode_default("prompt_drain_s")
    # A decode replica's token budget (its engine's max_num_batched_tokens); None: the cost
    # model's, which every prefill replica has. `pdserve up` caps a decode worker beside
    # prefill workers (services/decode/settings.py DISAGGREGATED_MAX_NUM_BATCHED_TOKENS).
    decode_max_num_batched_tokens: int | None = None
    # The router calls Decode with Prefill (the decode worker follows the prefill's KV), so the
    # decode worker counts the request from the start. Its block reservation is not modelled:
    # the blocks are taken when the KV lands.
    overlap_handoff: bool = _router_default("overlap_handoff")
    weights: policy.Weights = field(default_factory=lambda: policy.Weights(
        _router_default("overlap_weight"), _router_default("load_weight")))  # fmt: skip
    max_inflight_requests: int = _router_default("max_inflight_requests")
    max_inflight_per_worker: int = _router_default("max_inflight_per_worker")
    deadline_s: float = _router_default("default_deadline_s")
    staleness_s: float = _router_default("heartbeat_interval_s")  # workers publish their load
    fast_forward: bool = True

    def __post_init__(self) -> None:
        if self.num_decode < 1 or self.num_prefill < 0:
            raise ValueError("a cluster needs --decode >= 1 and --prefill >= 0")
        if self.staleness_s <= 0:
            raise ValueError("staleness_s must be > 0")
        if self.disaggregation_policy not in ("cost", "threshold"):
            raise ValueError("disaggregation_policy must be cost or threshold")
        if (
            self.decode_max_num_batched_tokens is not None
            and self.decode_max_num_batched_tokens < 1
        ):
            raise ValueError("a decode replica's max_num_batched_tokens must be >= 1")


class _PromptKeys:
    """A request's tokens as the simulated replicas see them, and its chained block keys.

    The tokens are runs of one id each: the prefix group's id over the shared prefix, the
    request's own id over the rest of the prompt, then outputs that are all token 0. So the
    whole token prefix a chained key stands for is known from the block's index: inside the
    shared prefix it is the group's i-th block; past the request's own first token it is the
    request's own; past a prompt that is all shared prefix (no own token), the group's for that
    prompt length. The keys name exactly that (ints, a tuple in the last case) for every full
    block of prompt and output, computed at once without hashing: equal token prefixes get
    equal keys and different ones different keys, as the chained BLAKE2b would (barring its
    collisions). A hit still compares the block's tokens.

    ``chain`` and ``tokens`` are the ``key_chain`` and ``block_tokens`` of the flight's
    sequences (prefill and decode); ``chain[:num_blocks]`` are the prompt's full blocks, the
    router's ``chain_block_keys``."""

    def __init__(self, index: int, group: int, num_prefix: int, num_prompt: int,
                 num_output: int, block_size: int) -> None:  # fmt: skip
        own = _UNIQUE_TOKEN_BASE + index
        self.prompt = [group] * num_prefix + [own] * (num_prompt - num_prefix)
        self.block_size = block_size
        self.num_blocks = num_prompt // block_size
        runs = ((group, num_prefix), (own, num_prompt - num_prefix), (0, num_output))
        self.tokens = _block_tokens([(t, n) for t, n in runs if n], block_size)
        num_full, num_shared = len(self.tokens), min(num_prefix // block_size, len(self.tokens))
        chain: list = [-((group << 32) + i) - 1 for i in range(num_shared)]
        if num_prefix < num_prompt:  # every later block holds the request's own first token
            first = ((index + 1) << 32) + num_shared
            chain += range(first, first + num_full - num_shared)
        else:
            chain += [(group, num_prompt, i) for i in range(num_shared, num_full)]
        self.chain: list[BlockKey] = chain


def _block_tokens(runs: list[tuple[int, int]], block_size: int) -> list[tuple[int, ...]]:
    """The tokens of each full block of the sequence made of ``runs`` ((token id, count), with
    consecutive ids different): the blocks inside one run share one tuple, a block spanning
    runs gets its own."""
    bs, out, start = block_size, [], 0
    num_full = sum(count for _, count in runs) // bs
    for token, count in runs:
        end = start + count
        first, last = -(-start // bs), min(end // bs, num_full)  # the blocks inside this run
        out += [_span(runs, b * bs, bs) for b in range(len(out), min(first, num_full))]
        if last > first:
            out += [(token,) * bs] * (last - first)
        start = end
    out += [_span(runs, b * bs, bs) for b in range(len(out), num_full)]
    return out


def _span(runs: list[tuple[int, int]], start: int, length: int) -> tuple[int, ...]:
    """Tokens ``start`` to ``start + length`` of the sequence made of ``runs``."""
    tokens: list[int] = []
    end, run_start = start + length, 0
    for token, count in runs:
        lo, hi = max(start, run_start), min(end, run_start + count)
        if hi > lo:
            tokens += [token] * (hi - lo)
        run_start += count
    return tuple(tokens)


@dataclass
class _Flight:
    """One request's simulated state."""

    req: Request
    record: result.RequestRecord
    keys: _PromptKeys
    plan: policy.RoutePlan | None = None
    prefill_start_s: float | None = None
    num_tokens: int = 0
    last_token_s: float = 0.0
    seq: Sequence | None = None
    # The decode worker's KV load (LLMEngine.start_load): pool blocks reserved for the prompt's
    # full blocks from ``load_first`` on; None while none is open.
    reserved: list[int] | None = None
    load_first: int = 0
    # KV blocks of its whole prompt and output (``admission.blocks_needed``), as the router's
    # decode-slot estimate counts it at every later arrival
    num_whole_blocks: int = 0


@dataclass
class _Stretch:
    seqs: list[Sequence]
    durations_s: np.ndarray  # of each fast-forwarded step
    ends_s: np.ndarray  # end time of each fast-forwarded step
    num_steps: int
    num_recorded: int = 0  # steps whose start the engine's StepCosts has seen
    worker_overhead_s: float = 0.0  # of each duration, not in what the engine measures
    # ``ends_s`` as floats, searched with bisect (numpy's per-call cost dominates on a few steps)
    end_times_s: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.end_times_s = self.ends_s.tolist()

    def record_started(self, costs: StepCosts, t: float) -> None:
        """Record every step started by ``t`` (the engine records a step as it runs)."""
        started = min(self.num_steps, bisect_right(self.end_times_s, t) + 1)
        for d in self.durations_s[self.num_recorded : started].tolist():
            costs.record(0, len(self.seqs), d - self.worker_overhead_s)
        self.num_recorded = max(self.num_recorded, started)


class _Replica:
    def __init__(self, worker_id: str, role: str, cost: CostModel,
                 max_num_batched_tokens: int | None = None) -> None:  # fmt: skip
        lim = cost.limits
        self.worker_id, self.role = worker_id, role
        self.bm = BlockManager(lim.num_kv_blocks, lim.block_size, key_fn=_no_hashing)
        self.sched = Scheduler(self.bm, lim.max_num_seqs,
                               max_num_batched_tokens or lim.max_num_batched_tokens)  # fmt: skip
        self.plan: SchedulerPlan | None = None
        self.stretch: _Stretch | None = None
        self.busy = False
        self.step_end_s = 0.0  # when the last step started (not fast-forwarded) ends
        self.version = 0  # bumped to invalidate a scheduled step end
        self.step_costs = StepCosts()  # what the engine learns from its steps, and reports
        self.report: dict = {}  # the load published at the last heartbeat
        self.target_step_s: float | None = None  # decode workers' prompt-chunk target
        self.prompt_drain_s: float | None = None
        self.num_loading = 0  # KV loads open: the worker reports them as waiting

    def prompt_budget(self) -> int | None:
        """The engine's ``LLMEngine._prompt_budget``: prompt tokens next to running decodes."""
        return self.step_costs.step_budget(
            self.target_step_s, self.prompt_drain_s, self.sched.max_num_batched_tokens,
            self.sched.num_pending_prompt_tokens,
        )  # fmt: skip

    def publish(self) -> None:
        s = self.sched
        self.report = {"running": len(s.running), "waiting": len(s.waiting) + self.num_loading,
                       "pending_prompt_tokens": s.num_pending_prompt_tokens,
                       "num_free_blocks": self.bm.num_free_blocks,
                       **self.step_costs.report(),
                       "max_num_batched_tokens": s.max_num_batched_tokens,
                       "target_step_s": self.target_step_s or 0.0,
                       "prompt_drain_s": self.prompt_drain_s or 0.0}  # fmt: skip

    def cached_tokens(self, keys: _PromptKeys) -> int:
        n = 0
        while n < keys.num_blocks and self.bm.cached_block(keys.chain[n]) is not None:
            n += 1
        return n * self.bm.block_size


class Simulator:
    def __init__(self, workload: list[Request], config: SimConfig, cost: CostModel) -> None:
        self.workload, self.config, self.cost = workload, config, cost
        self.decode = [_Replica(f"decode-{i}", "decode", cost, config.decode_max_num_batched_tokens)
                       for i in range(config.num_decode)]  # fmt: skip
        self.prefill = [
            _Replica(f"prefill-{i}", "prefill", cost) for i in range(config.num_prefill)
        ]
        for rep in self.decode:
            rep.target_step_s = config.decode_target_step_s
            rep.prompt_drain_s = config.decode_prompt_drain_s
        self.prefill_tokens_per_s = config.prefill_tokens_per_s  # the router's prior, refined
        self.replicas = {r.worker_id: r for r in self.decode + self.prefill}
        self.flights: dict[str, _Flight] = {}
        self.records: list[result.RequestRecord] = []
        self.inflight: dict[str, int] = dict.fromkeys(self.replicas, 0)
        self.queued_tokens: dict[str, int] = dict.fromkeys(self.replicas, 0)
        # The router's Decode calls per worker (its ``_decode_inflight``; none on a prefill worker).
        self.decode_held: dict[str, dict[int, _Flight]] = {wid: {} for wid in self.replicas}
        # (whole output, request index) of each Decode call, ended ones removed lazily
        self._held_outputs: dict[str, list[tuple[int, int]]] = {wid: [] for wid in self.replicas}
        self.num_inflight = 0
        self.groups: dict[str, int] = {}
        self._heap: list = []
        self._order = itertools.count()
        self._next_arrival = 0
        self._gaps: list[float] = []
        self._gap_weights: list[float] = []
        # (gaps between a stretch's steps, the sequences that saw each): weighted ITL samples
        self._gap_blocks: list[tuple[list[float], int]] = []

    def start_from(self, step_costs: dict[str, StepCosts]) -> None:
        """Start replicas (by worker id) with what a running worker's engine had learned
        (its step log's ``StepCosts.state()``), published as its first report: a live stack
        serves a run with the costs its earlier requests taught it."""
        for worker_id, costs in step_costs.items():
            rep = self.replicas[worker_id]
            rep.step_costs = costs
            rep.publish()

    # ---- the event loop ----

    def run(self) -> dict:
        if self.workload:
            self._push(self.workload[0].arrived_at_s, self._arrive)
            self._push(self.workload[0].arrived_at_s, self._heartbeat)
        # The loop allocates millions of short-lived objects but no reference cycles, while the
        # cyclic collector's full passes walk every live block, tuple and record: a third of
        # the run. Reference counting frees everything the loop drops. The result is built
        # before collecting again: the first collection after the loop walks every object the
        # loop left alive (a tenth of a run when it fell in ``result``).
        collecting = gc.isenabled()
        gc.disable()
        try:
            while self._heap:
                t, _, fn, args = heapq.heappop(self._heap)
                fn(t, *args)
            return self.result()
        finally:
            if collecting:
                gc.enable()

    def _push(self, t: float, fn, *args) -> None:
        heapq.heappush(self._heap, (t, next(self._order), fn, args))

    def _heartbeat(self, t: float) -> None:
        for rep in self.replicas.values():
            if rep.stretch is not None:
                rep.stretch.record_started(rep.step_costs, t)
            rep.publish()
        if self._next_arrival < len(self.workload) or self.num_inflight:
            self._push(t + self.config.staleness_s, self._heartbeat)

    # ---- the router ----

    def _arrive(self, t: float) -> None:
        index = self._next_arrival
        self._next_arrival += 1
        if self._next_arrival < len(self.workload):
            self._push(self.workload[self._next_arrival].arrived_at_s, self._arrive)
        req = self.workload[index]
        record = result.RequestRecord(index, req.arrived_at_s, req.num_prefill_tokens, 0)
        self.records.append(record)
        keys = _PromptKeys(index, self._group(req), req.prefix_tokens, req.num_prefill_tokens,
                           req.num_decode_tokens, self.cost.limits.block_size)  # fmt: skip
        whole = admission.blocks_needed(req.num_prefill_tokens + req.num_decode_tokens,
                                        self.cost.limits.block_size)  # fmt: skip
        flight = _Flight(req, record, keys, num_whole_blocks=whole)
        plan = policy.plan_route(
            self._loads(self.decode, keys), self._loads(self.prefill, keys),
            req.num_prefill_tokens, self.config.weights, self.config.threshold_tokens,
            costs=self._costs(),
        )  # fmt: skip
        if not self._admit(plan, req, record):
            return
        flight.plan = plan
        self.flights[str(index)] = flight
        self.num_inflight += 1
        dispatch_at = t + self.cost.dispatch_s
        if plan.prefill is not None:
            record.route = "disaggregated"
            wid = plan.prefill.worker_id
            self.inflight[wid] += 1
            self.queued_tokens[wid] += plan.uncached_tokens
            if self.config.overlap_handoff:
                self._call_decode(plan.decode.worker_id, flight)
                # (pushed first: the load is open before the prefill's first step can fail)
                self._push(dispatch_at, self._start_load, self.replicas[plan.decode.worker_id],
                           flight)  # fmt: skip
            seq = self._sequence(index, keys, 1)
            self._push(dispatch_at, self._submit, self.replicas[wid], seq)
        else:
            record.route = "local"
            wid = plan.decode.worker_id
            self._call_decode(wid, flight)
            self.queued_tokens[wid] += plan.uncached_tokens
            flight.seq = self._sequence(index, keys, req.num_decode_tokens)
            self._push(dispatch_at, self._submit, self.replicas[wid], flight.seq)

    def _call_decode(self, worker_id: str, flight: _Flight) -> None:
        """The router's Decode call starts: counted in flight, its whole output held."""
        self.inflight[worker_id] += 1
        self.decode_held[worker_id][flight.record.index] = flight
        heapq.heappush(self._held_outputs[worker_id],
                       (flight.req.num_decode_tokens, flight.record.index))  # fmt: skip

    def _min_held_output(self, worker_id: str) -> int:
        """The shortest whole output among the worker's Decode calls (0: none): the heap's
        smallest entry still held (ended calls are dropped as they surface)."""
        heap, held = self._held_outputs[worker_id], self.decode_held[worker_id]
        if len(heap) > 2 * len(held) + 64:  # ended calls below the top: drop them all
            heap[:] = [entry for entry in heap if entry[1] in held]
            heapq.heapify(heap)
        while heap and heap[0][1] not in held:
            heapq.heappop(heap)
        return heap[0][0] if heap else 0

    def _decode_call_ended(self, worker_id: str, flight: _Flight) -> None:
        self.inflight[worker_id] -= 1
        del self.decode_held[worker_id][flight.record.index]

    def _loads(self, replicas: list[_Replica], keys: _PromptKeys) -> list[policy.WorkerLoad]:
        """The router's ``_loads``: its own counts, or the worker's report when higher."""
        return [
            policy.worker_load(
                r.worker_id,
                r.report,
                self.config.max_inflight_per_worker,
                own_inflight=self.inflight[r.worker_id],
                own_queued_tokens=self.queued_tokens[r.worker_id],
                cached_tokens=r.cached_tokens(keys),
                min_output_tokens=self._min_held_output(r.worker_id),
            )  # fmt: skip
            for r in replicas
        ]

    def _costs(self) -> policy.CostModel | None:
        """The router's ``_costs``: the cost policy's priors; None selects the threshold."""
        c = self.config
        if c.disaggregation_policy == "threshold":
            return None
        return policy.CostModel(
            prefill_tokens_per_s=self.prefill_tokens_per_s, decode_step_s=c.decode_step_s,
            handoff_s=c.handoff_s, handoff_s_per_token=c.handoff_s_per_token,
            tpot_slo_s=c.tpot_slo_s,
        )  # fmt: skip

    def _admit(self, plan: policy.RoutePlan | None, req: Request,
               record: result.RequestRecord) -> bool:  # fmt: skip
        """The router's ``_admit``: the target's prompt queue (its own count or the target's
        report, the larger) plus the decode worker's wait for a slot and blocks for the whole
        output (``admission.decode_wait_s``), against the deadline."""
        assert plan is not None  # SimConfig guarantees a decode replica
        target = self.replicas[plan.prefill.worker_id if plan.prefill else plan.decode.worker_id]
        queued = max(self.queued_tokens[target.worker_id],
                     target.report.get("pending_prompt_tokens", 0))  # fmt: skip
        rate = self.prefill_tokens_per_s
        decode = self.replicas[plan.decode.worker_id]
        wait_s = self._decode_wait_s(decode, req.num_prefill_tokens + req.num_decode_tokens)
        if wait_s is None:
            record.error = (
                "rejected: prompt + max_tokens needs more KV blocks than a decode worker has"
            )
            return False
        ttft = policy.predict_ttft_s(queued, plan.uncached_tokens, rate) + wait_s
        verdict = policy.admit(self.num_inflight, self.config.max_inflight_requests, ttft,
                               self.config.deadline_s, queued, rate)  # fmt: skip
        if not verdict.admitted:
            record.error = f"rejected ({verdict.reason_class}): {verdict.reason}"
        return verdict.admitted

    def _decode_wait_s(self, rep: _Replica, num_tokens: int) -> float | None:
        """The router's ``_decode_wait_s`` from the worker's last report and the router's
        calls there (their remaining output as last streamed)."""
        lim, report, bs = self.cost.limits, rep.report, rep.bm.block_size
        state = admission.DecodeCapacity(
            max_num_seqs=lim.max_num_seqs, num_total_blocks=lim.num_kv_blocks,
            num_free_blocks=report.get("num_free_blocks"),
            num_reported_seqs=report.get("running", 0) + report.get("waiting", 0),
            step_s=report.get("step_s", 0.0) or self.config.decode_step_s,
            inflight=tuple(
                admission.Inflight(f.req.num_decode_tokens - f.num_tokens, f.num_whole_blocks)
                for f in self.decode_held[rep.worker_id].values()
            ),
        )  # fmt: skip
        return admission.decode_wait_s(state, admission.blocks_needed(num_tokens, bs))

    def _group(self, req: Request) -> int:
        """The token id of the request's prefix group (1, 2, ...; 0 without a prefix)."""
        if not req.prefix_tokens:
            return 0
        return self.groups.setdefault(req.prefix_group, len(self.groups) + 1)

    @staticmethod
    def _sequence(index: int, keys: _PromptKeys, max_tokens: int) -> Sequence:
        seq = Sequence(str(index), keys.prompt, max_tokens, _ROOT, index)
        seq.key_chain, seq.block_tokens = keys.chain, keys.tokens
        return seq

    # ---- replicas ----

    def _submit(self, t: float, rep: _Replica, seq: Sequence) -> None:
        rep.sched.add(seq)
        if rep.stretch is not None:
            self._cut_stretch(rep, t)
        elif not rep.busy:
            self._start_step(rep, t)

    def _start_step(self, rep: _Replica, t: float) -> None:
        if self.config.fast_forward and self._start_stretch(rep, t):
            return
        plan = rep.sched.schedule(rep.prompt_budget())
        # As the engine: blocks that KV loads hold come back, so the head request waits.
        while (plan.is_empty and rep.sched.waiting and not rep.sched.running
               and not rep.bm.num_reserved_blocks):  # fmt: skip
            self._fail_unschedulable(rep, t)
            plan = rep.sched.schedule(rep.prompt_budget())
        if plan.is_empty:
            rep.busy = False
            return
        if rep.role == "prefill":
            for chunk in plan.chunks:
                flight = self.flights[chunk.seq.request_id]
                if flight.prefill_start_s is None:
                    flight.prefill_start_s = t
        rep.busy, rep.plan = True, plan
        rep.version += 1
        shape, num_prompt_tokens, num_decodes = _shape(plan)
        duration_s = float(self.cost.step_s(shape)) * self._slowdown(rep)
        engine_s = duration_s - self.cost.worker_overhead_s  # what the engine times itself
        rep.step_costs.record(num_prompt_tokens, num_decodes, engine_s)
        rep.step_end_s = t + duration_s
        self._push(rep.step_end_s, self._end_step, rep, rep.version)

    def _slowdown(self, rep: _Replica) -> float:
        """The cost model's factors on a step: a prefill replica's own, and contention while
        another replica computes (replicas sharing a machine's memory system; 1.0: none)."""
        role = self.cost.prefill_factor if rep.role == "prefill" else 1.0
        factor = self.cost.contention_factor
        if factor == 1.0 or not any(r.busy for r in self.replicas.values() if r is not rep):
            return role
        return role * factor

    def _fail_unschedulable(self, rep: _Replica, t: float) -> None:
        seq = rep.sched.waiting[0]
        rep.sched.finish(seq, FinishReason.ERROR)
        flight = self.flights[seq.request_id]
        flight.record.error = f"prompt of {seq.num_prompt_tokens} tokens does not fit the KV pool"
        self._release(flight, rep, t)

    def _end_step(self, t: float, rep: _Replica, version: int) -> None:
        if version != rep.version:
            return
        plan, flights = rep.plan, self.flights
        # (asked before the update, which grows the sequences and makes ``samples`` stale;
        # ``ScheduledChunk.samples`` inlined)
        samplers = [c.seq for c in plan.chunks if c.start + c.num_tokens
                    == len(c.seq.prompt_token_ids) + len(c.seq.output_token_ids)]  # fmt: skip
        rep.sched.update(plan, dict.fromkeys([seq.request_id for seq in samplers], 0))
        if rep.role == "prefill":
            for seq in samplers:
                self._prefill_done(rep, flights[seq.request_id], seq, t)
        else:
            for seq in samplers:
                flight = flights[seq.request_id]
                self._tokens(flight, t, 1)
                if len(seq.output_token_ids) >= seq.max_tokens:
                    self._finish(rep, flight, t)
        self._start_step(rep, t)

    def _tokens(self, flight: _Flight, t: float, num_new: int) -> None:
        """``num_new`` tokens reach the client at ``t`` as one chunk."""
        if flight.num_tokens == 0:
            flight.record.ttft_s = t - flight.req.arrived_at_s
            if flight.plan.prefill is None:
                self.queued_tokens[flight.plan.decode.worker_id] -= flight.plan.uncached_tokens
        else:
            self._gaps.append((t - flight.last_token_s) / num_new)
            self._gap_weights.append(num_new)
        flight.num_tokens += num_new
        flight.last_token_s = t

    def _prefill_done(self, rep: _Replica, flight: _Flight, seq: Sequence, t: float) -> None:
        rep.sched.finish(seq, FinishReason.LENGTH)
        wid = rep.worker_id
        self.inflight[wid] -= 1
        self.queued_tokens[wid] -= flight.plan.uncached_tokens
        # as the router times its Prefill call: from the call to the reply, queueing included
        self._observe_rate(
            seq.num_prompt_tokens - seq.num_cached_tokens, t - flight.req.arrived_at_s
        )
        n = flight.req.num_prefill_tokens
        ready = self.cost.handoff_ready_s(flight.prefill_start_s, t, n)
        decode = self.replicas[flight.plan.decode.worker_id]
        if not self.config.overlap_handoff:
            self._call_decode(decode.worker_id, flight)
        self._push(ready, self._handoff, decode, flight)

    def _observe_rate(self, num_tokens: int, elapsed_s: float) -> None:
        self.prefill_tokens_per_s = policy.observe_prefill_rate(
            self.prefill_tokens_per_s, num_tokens, elapsed_s
        )

    def _start_load(self, t: float, rep: _Replica, flight: _Flight) -> None:
        """The decode worker's ``LLMEngine.start_load``: skip the prompt's leading blocks it
        holds, reserve pool blocks for the rest (as many as fit; the rest is recomputed).
        With the overlapped handoff it opens when the router calls Decode with Prefill, so the
        reservation holds blocks while the prompt is prefilled; otherwise when the KV lands."""
        if rep.stretch is not None:
            self._hold_stretch_blocks(rep, t)
        bm, keys, first = rep.bm, flight.keys, 0
        while (
            first < keys.num_blocks and bm.lookup(keys.chain[first], keys.tokens[first]) is not None
        ):
            first += 1
        flight.load_first, flight.reserved = first, bm.reserve(keys.num_blocks - first)
        rep.num_loading += 1

    def _close_load(self, rep: _Replica, flight: _Flight, num_loaded_blocks: int) -> None:
        """Commit the first ``num_loaded_blocks`` reserved blocks to the prefix cache and free
        the rest (``LLMEngine``'s commit of a KV load, or its release with 0)."""
        keys, first = flight.keys, flight.load_first
        end = first + num_loaded_blocks
        cached = list(zip(keys.chain[first:end], keys.tokens[first:end], strict=True))
        rep.bm.release_reserved(flight.reserved, cached)
        flight.reserved = None
        rep.num_loading -= 1

    def _handoff(self, t: float, rep: _Replica, flight: _Flight) -> None:
        """The KV is in: commit the loaded blocks, then decode from the prefill's token."""
        if flight.reserved is None:
            self._start_load(t, rep, flight)
        self._close_load(rep, flight, len(flight.reserved))
        flight.seq = self._sequence(flight.record.index, flight.keys, flight.req.num_decode_tokens)
        flight.seq.output_token_ids.append(0)
        # Streamed at admission, before the decode worker's first step for it: its engine
        # thread admits between steps, so after the step in flight.
        admitted_s = self._step_in_flight_end_s(rep, t)
        self._tokens(flight, admitted_s, 1)
        if flight.req.num_decode_tokens == 1:  # the prefill's token was the whole answer
            flight.record.finish(flight.record.ttft_s, admitted_s - flight.req.arrived_at_s, 1)
            self._release(flight, rep, t)
            return
        self._submit(t, rep, flight.seq)

    @staticmethod
    def _step_in_flight_end_s(rep: _Replica, t: float) -> float:
        """When the replica's step in flight at ``t`` ends (``t`` when it is idle)."""
        if rep.stretch is not None:
            ends = rep.stretch.ends_s
            return max(t, float(ends[min(int(np.searchsorted(ends, t, side="right")),
                                         rep.stretch.num_steps - 1)]))  # fmt: skip
        return max(t, rep.step_end_s) if rep.busy else t

    def _finish(self, rep: _Replica, flight: _Flight, t: float) -> None:
        rep.sched.finish(flight.seq, FinishReason.LENGTH)
        flight.record.finish(flight.record.ttft_s, t - flight.req.arrived_at_s, flight.num_tokens)
        self._release(flight, rep, t)

    def _release(self, flight: _Flight, rep: _Replica, t: float) -> None:
        if rep.role == "decode":
            self._decode_call_ended(rep.worker_id, flight)
        else:
            self.inflight[rep.worker_id] -= 1
        # Still queued at the router: failed on the prefill worker, or before a local first token.
        never_started = flight.num_tokens == 0 and flight.plan.prefill is None
        if rep.role == "prefill" or never_started:
            self.queued_tokens[rep.worker_id] -= flight.plan.uncached_tokens
        if rep.role == "prefill" and self.config.overlap_handoff:  # its decode call ends too
            decode = self.replicas[flight.plan.decode.worker_id]
            self._decode_call_ended(decode.worker_id, flight)
            if flight.reserved is not None:
                self._close_load(decode, flight, 0)
                if decode.stretch is None and not decode.busy:  # a request may wait on those
                    self._start_step(decode, t)
        self.num_inflight -= 1
        del self.flights[str(flight.record.index)]

    # ---- fast-forward of pure-decode stretches ----

    def _start_stretch(self, rep: _Replica, t: float) -> bool:
        sched = rep.sched
        n = len(sched.running)
        if rep.role == "prefill" or sched.waiting or not n or n > sched.max_num_batched_tokens:
            return False
        if self.cost.contention_factor != 1.0 and len(self.replicas) > 1:
            return False  # another replica starting or stopping changes each step's time
        steps, context, bs = 1 << 30, 0, rep.bm.block_size
        # (tokens a sequence's blocks hold, minus its computed tokens)
        rooms: list[int] = []
        # newest first: a sequence still prefilling is usually the last
        for seq in reversed(sched.running):
            computed, num_prompt = seq.num_computed_tokens, len(seq.prompt_token_ids)
            num_output = len(seq.output_token_ids)
            if computed != num_prompt + num_output - 1 or computed < num_prompt:
                return False
            if seq.max_tokens - num_output < steps:
                steps = seq.max_tokens - num_output
            context += computed
            rooms.append(len(seq.block_table) * bs - computed)
        steps = _steps_that_fit(rooms, bs, rep.bm.num_free_blocks, steps)
        if steps < 2:
            return False
        # every sequence reads its context plus the new token
        ctx = np.arange(context + n, context + n * (steps + 1), n, dtype=float)
        durations = self.cost.step_s(StepShape(n, n, ctx, ctx))
        slowdown = self._slowdown(rep)
        if slowdown != 1.0:  # (x * 1.0 is x: skip an array pass)
            durations = durations * slowdown
        if np.ndim(durations) == 0:
            durations = np.full(steps, float(durations))
        ends = t + np.cumsum(durations)
        rep.stretch = _Stretch(list(sched.running), durations, ends, steps,
                               worker_overhead_s=self.cost.worker_overhead_s)  # fmt: skip
        rep.stretch.record_started(rep.step_costs, t)
        rep.busy = True
        rep.version += 1
        self._push(float(ends[-1]), self._end_stretch, rep, rep.version)
        return True

    def _cut_stretch(self, rep: _Replica, t: float) -> None:
        """A sequence joined: the stretch ends with the step in flight at ``t``."""
        stretch = rep.stretch
        in_flight = bisect_right(stretch.end_times_s, t)
        keep = min(in_flight + 1, stretch.num_steps)
        if keep < stretch.num_steps:
            stretch.num_steps = keep
            rep.version += 1
            self._push(stretch.end_times_s[keep - 1], self._end_stretch, rep, rep.version)

    def _hold_stretch_blocks(self, rep: _Replica, t: float) -> None:
        """Blocks are about to leave the pool mid-stretch (a KV load's reservation): end the
        stretch with the step in flight at ``t`` and give its sequences the blocks of the steps
        kept now, as the engine holds a step's blocks from when it scheduled the step. (The
        stretch was sized to the free blocks when it started.)"""
        self._cut_stretch(rep, t)
        for seq in rep.stretch.seqs:
            rep.bm.grow(seq, rep.stretch.num_steps)

    def _end_stretch(self, t: float, rep: _Replica, version: int) -> None:
        if version != rep.version:
            return
        stretch, rep.stretch = rep.stretch, None
        m, bm, ends = stretch.num_steps, rep.bm, stretch.end_times_s
        stretch.record_started(rep.step_costs, t)
        first_end_s, bs, flights, zeros = ends[0], bm.block_size, self.flights, [0] * m
        gaps, gap_weights = self._gaps, self._gap_weights
        for seq in stretch.seqs:
            computed = seq.num_computed_tokens
            if computed + m > len(seq.block_table) * bs:
                bm.grow(seq, m)  # (a no-op otherwise: skip the call)
            computed = seq.num_computed_tokens = computed + m
            seq.output_token_ids += zeros
            if computed // bs > len(seq.block_keys):
                bm.commit_full_blocks(seq)  # (a no-op otherwise: skip the call)
            flight = flights[seq.request_id]
            gaps.append(first_end_s - flight.last_token_s)
            flight.num_tokens += m
            flight.last_token_s = t
        gap_weights += [1] * len(stretch.seqs)
        if m > 1:
            step_gaps_s = [ends[i + 1] - ends[i] for i in range(m - 1)]  # (np.diff's, for a few)
            self._gap_blocks.append((step_gaps_s, len(stretch.seqs)))
        for seq in stretch.seqs:
            if len(seq.output_token_ids) >= seq.max_tokens:
                self._finish(rep, self.flights[seq.request_id], t)
        self._start_step(rep, t)

    # ---- output ----

    def result(self, conditions: dict | None = None) -> dict:
        gaps, weights = list(self._gaps), list(self._gap_weights)
        for block_gaps, num_seqs in self._gap_blocks:
            gaps += block_gaps
            weights += [num_seqs] * len(block_gaps)
        return result.build(self.records, np.asarray(gaps, dtype=float),
                            np.asarray(weights, dtype=float), self.config.slo, "sim",
                            conditions or self.conditions())  # fmt: skip

    def conditions(self) -> dict:
        c = self.config
        return {
            "cost_model": self.cost.name, "num_prefill": c.num_prefill, "num_decode": c.num_decode,
            "gpus_per_replica": self.cost.gpus_per_replica,
            "engine": asdict(self.cost.limits),
            "decode_max_num_batched_tokens": self.decode[0].sched.max_num_batched_tokens,
            "disaggregation_policy": c.disaggregation_policy, "overlap_handoff": c.overlap_handoff,
            "threshold_tokens": c.threshold_tokens, "staleness_s": c.staleness_s,
            "max_inflight_requests": c.max_inflight_requests,
        }  # fmt: skip


def _shape(plan: SchedulerPlan) -> tuple[StepShape, int, int]:
    """The step's shape, its prompt tokens and its decodes (``plan.num_prompt_tokens`` and
    the chunks that are ``is_decode``), in one pass."""
    tokens, seqs, pairs, context, num_prompt, num_decodes = plan_totals(plan)
    return StepShape(tokens, seqs, pairs, context), num_prompt, num_decodes


def _steps_that_fit(rooms: list[int], bs: int, free: int, steps: int) -> int:
    """The most decode steps (<= ``steps``) whose new blocks ``free`` blocks cover, for
    sequences with ``rooms`` free token slots in their blocks: growing k more tokens needs a
    block exactly when k exceeds the room, and one more per ``bs`` beyond."""

    def needed(k: int) -> int:
        return sum(-(-(k - room) // bs) for room in rooms if k > room)

    if needed(steps) <= free:
        return steps
    lo, hi = 0, steps  # needed(lo) fits, needed(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if needed(mid) <= free else (lo, mid)
    return lo


def simulate(workload: list[Request], config: SimConfig, cost: CostModel) -> dict:
    return Simulator(workload, config, cost).run()
