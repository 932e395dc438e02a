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
and the request joins decode with the prefill's token, which the decode worker emits with the
first step that includes it (as ``LLMEngine`` does).

Fast-forward: when a replica's batch is pure decode (nothing waiting, every running sequence
one token behind, the whole batch within the token budget and enough free blocks), the
scheduler's next steps are known: each running sequence gains one token per step until the
first one finishes. Those steps are costed in one vectorized call and applied through the same
BlockManager calls a step makes; a request arriving at the replica cuts the stretch after the
step in flight. ``fast_forward=False`` steps one by one; a test checks both agree exactly.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import asdict, dataclass, field

import numpy as np

from pdserve.engine.block_hash import BlockKey, next_block_key, root_key
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.scheduler import Scheduler, SchedulerPlan
from pdserve.engine.sequence import FinishReason, Sequence
from pdserve.engine.step_costs import StepCosts
from pdserve.sim.costs import CostModel, StepShape
from pdserve.workload import result
from pdserve.workload.format import Request
from services.decode.settings import DecodeSettings
from services.router import policy
from services.router.settings import RouterSettings

_ROOT = root_key("pdserve-sim")
_UNIQUE_TOKEN_BASE = 1 << 20  # request i's own tokens are this + i; prefix groups are below


def _router_default(name: str):
    return RouterSettings.model_fields[name].default


def _decode_default(name: str):
    return DecodeSettings.model_fields[name].default


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


class _PromptKeys:
    """The prompt's chained block keys (the router's ``chain_block_keys``), computed only as
    far as a lookup reads them: a prompt nobody holds costs one hash, not one per block."""

    def __init__(self, prompt: list[int], block_size: int) -> None:
        self.prompt, self.block_size = prompt, block_size
        self.num_blocks = len(prompt) // block_size
        self.known: list[BlockKey] = []

    def get(self, i: int) -> BlockKey:
        bs = self.block_size
        while len(self.known) <= i:
            j = len(self.known)
            parent = self.known[-1] if self.known else _ROOT
            self.known.append(next_block_key(parent, self.prompt[j * bs : (j + 1) * bs]))
        return self.known[i]

    def adopt(self, keys: list[BlockKey]) -> None:
        """Keys an engine already chained for this prompt (equal by construction)."""
        if len(keys) > len(self.known):
            self.known = keys[: self.num_blocks]


@dataclass
class _Flight:
    """One request's simulated state."""

    req: Request
    record: result.RequestRecord
    prompt_ids: list[int]
    keys: _PromptKeys
    plan: policy.RoutePlan | None = None
    prefill_start_s: float | None = None
    first_pending: bool = False  # decode holds the prefill's token, emitted with its first step
    num_tokens: int = 0
    last_token_s: float = 0.0
    seq: Sequence | None = None


@dataclass
class _Stretch:
    seqs: list[Sequence]
    durations_s: np.ndarray  # of each fast-forwarded step
    ends_s: np.ndarray  # end time of each fast-forwarded step
    num_steps: int
    num_recorded: int = 0  # steps whose start the engine's StepCosts has seen

    def record_started(self, costs: StepCosts, t: float) -> None:
        """Record every step started by ``t`` (the engine records a step as it runs)."""
        started = min(self.num_steps, int(np.searchsorted(self.ends_s, t, side="right")) + 1)
        for d in self.durations_s[self.num_recorded : started]:
            costs.record(0, len(self.seqs), float(d))
        self.num_recorded = max(self.num_recorded, started)


class _Replica:
    def __init__(self, worker_id: str, role: str, cost: CostModel) -> None:
        lim = cost.limits
        self.worker_id, self.role = worker_id, role
        self.bm = BlockManager(lim.num_kv_blocks, lim.block_size)
        self.sched = Scheduler(self.bm, lim.max_num_seqs, lim.max_num_batched_tokens)
        self.plan: SchedulerPlan | None = None
        self.stretch: _Stretch | None = None
        self.busy = False
        self.version = 0  # bumped to invalidate a scheduled step end
        self.step_costs = StepCosts()  # what the engine learns from its steps, and reports
        self.report: dict = {}  # the load published at the last heartbeat
        self.target_step_s: float | None = None  # decode workers' prompt-chunk target
        self.prompt_drain_s: float | None = None

    def prompt_budget(self) -> int | None:
        """The engine's ``LLMEngine._prompt_budget``: prompt tokens next to running decodes."""
        return self.step_costs.step_budget(
            self.target_step_s, self.prompt_drain_s, self.sched.max_num_batched_tokens,
            self.sched.num_pending_prompt_tokens,
        )  # fmt: skip

    def publish(self) -> None:
        s = self.sched
        self.report = {"running": len(s.running), "waiting": len(s.waiting),
                       "pending_prompt_tokens": s.num_pending_prompt_tokens,
                       **self.step_costs.report()}  # fmt: skip

    def cached_tokens(self, keys: _PromptKeys) -> int:
        n = 0
        while n < keys.num_blocks and self.bm.cached_block(keys.get(n)) is not None:
            n += 1
        return n * self.bm.block_size


class Simulator:
    def __init__(self, workload: list[Request], config: SimConfig, cost: CostModel) -> None:
        self.workload, self.config, self.cost = workload, config, cost
        self.decode = [_Replica(f"decode-{i}", "decode", cost) for i in range(config.num_decode)]
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
        self.num_inflight = 0
        self.groups: dict[str, int] = {}
        self._heap: list = []
        self._order = itertools.count()
        self._next_arrival = 0
        self._gaps: list[float] = []
        self._gap_weights: list[float] = []
        self._gap_blocks: list[tuple[np.ndarray, int]] = []

    # ---- the event loop ----

    def run(self) -> dict:
        if self.workload:
            self._push(self.workload[0].arrived_at_s, self._arrive)
            self._push(self.workload[0].arrived_at_s, self._heartbeat)
        while self._heap:
            t, _, fn, args = heapq.heappop(self._heap)
            fn(t, *args)
        return self.result()

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
        prompt = self._prompt_ids(index, req)
        keys = _PromptKeys(prompt, self.cost.limits.block_size)
        flight = _Flight(req, record, prompt, keys)
        plan = policy.plan_route(
            self._loads(self.decode, keys), self._loads(self.prefill, keys),
            req.num_prefill_tokens, self.config.weights, self.config.threshold_tokens,
            costs=self._costs(),
        )  # fmt: skip
        if not self._admit(plan, record):
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
                self.inflight[plan.decode.worker_id] += 1
            seq = self._sequence(index, prompt, 1)
            self._push(dispatch_at, self._submit, self.replicas[wid], seq)
        else:
            record.route = "local"
            wid = plan.decode.worker_id
            self.inflight[wid] += 1
            self.queued_tokens[wid] += plan.uncached_tokens
            flight.seq = self._sequence(index, prompt, req.num_decode_tokens)
            self._push(dispatch_at, self._submit, self.replicas[wid], flight.seq)

    def _loads(self, replicas: list[_Replica], keys: _PromptKeys) -> list[policy.WorkerLoad]:
        """The router's ``_loads``: its own counts, or the worker's report when higher."""
        cap = self.config.max_inflight_per_worker
        out = []
        for r in replicas:
            rep = r.report
            wid = r.worker_id
            out.append(policy.WorkerLoad(
                worker_id=wid,
                num_inflight=max(self.inflight[wid], rep.get("running", 0) + rep.get("waiting", 0)),
                capacity=cap,
                cached_tokens=r.cached_tokens(keys),
                queued_prefill_tokens=max(self.queued_tokens[wid], rep.get("pending_prompt_tokens", 0)),
                num_running=rep.get("running", 0),
                step_s=rep.get("step_s", 0.0),
                prompt_tokens_per_s=rep.get("prompt_tokens_per_s", 0.0),
            ))  # fmt: skip
        return out

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

    def _admit(self, plan: policy.RoutePlan | None, record: result.RequestRecord) -> bool:
        assert plan is not None  # SimConfig guarantees a decode replica
        target = plan.prefill.worker_id if plan.prefill else plan.decode.worker_id
        queued = self.queued_tokens[target]
        rate = self.prefill_tokens_per_s
        ttft = policy.predict_ttft_s(queued, plan.uncached_tokens, rate)
        verdict = policy.admit(self.num_inflight, self.config.max_inflight_requests, ttft,
                               self.config.deadline_s, queued, rate)  # fmt: skip
        if not verdict.admitted:
            record.error = f"rejected ({verdict.reason_class}): {verdict.reason}"
        return verdict.admitted

    def _prompt_ids(self, index: int, req: Request) -> list[int]:
        own = [_UNIQUE_TOKEN_BASE + index] * (req.num_prefill_tokens - req.prefix_tokens)
        if not req.prefix_tokens:
            return own
        group = self.groups.setdefault(req.prefix_group, len(self.groups) + 1)
        return [group] * req.prefix_tokens + own

    @staticmethod
    def _sequence(index: int, prompt: list[int], max_tokens: int) -> Sequence:
        return Sequence(str(index), prompt, max_tokens, _ROOT, index)

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
        while plan.is_empty and rep.sched.waiting and not rep.sched.running:
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
        duration_s = float(self.cost.step_s(_shape(plan)))
        num_decodes = sum(1 for c in plan.chunks if c.is_decode)
        rep.step_costs.record(plan.num_prompt_tokens, num_decodes, duration_s)
        self._push(t + duration_s, self._end_step, rep, rep.version)

    def _fail_unschedulable(self, rep: _Replica, t: float) -> None:
        seq = rep.sched.waiting[0]
        rep.sched.finish(seq, FinishReason.ERROR)
        flight = self.flights[seq.request_id]
        flight.record.error = f"prompt of {seq.num_prompt_tokens} tokens does not fit the KV pool"
        self._release(flight, rep, t)

    def _end_step(self, t: float, rep: _Replica, version: int) -> None:
        if version != rep.version:
            return
        plan = rep.plan
        sampled = {c.seq.request_id: 0 for c in plan.chunks if c.samples}
        rep.sched.update(plan, sampled)
        for chunk in plan.chunks:  # (chunk.samples is stale now: the update grew the seq)
            flight = self.flights[chunk.seq.request_id]
            samples = chunk.seq.request_id in sampled
            if rep.role == "prefill":
                if samples:
                    self._prefill_done(rep, flight, chunk.seq, t)
            elif samples or flight.first_pending:
                num_new = int(samples) + int(flight.first_pending)
                flight.first_pending = False
                self._tokens(flight, t, num_new)
                if len(chunk.seq.output_token_ids) >= chunk.seq.max_tokens:
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
        flight.keys.adopt(seq.block_keys)
        rep.sched.finish(seq, FinishReason.LENGTH)
        wid = rep.worker_id
        self.inflight[wid] -= 1
        self.queued_tokens[wid] -= flight.plan.uncached_tokens
        self._observe_rate(flight.plan.uncached_tokens, t - flight.prefill_start_s)
        n = flight.req.num_prefill_tokens
        ready = self.cost.handoff_ready_s(flight.prefill_start_s, t, n)
        decode = self.replicas[flight.plan.decode.worker_id]
        if not self.config.overlap_handoff:
            self.inflight[decode.worker_id] += 1
        self._push(ready, self._handoff, decode, flight)

    def _observe_rate(self, num_tokens: int, elapsed_s: float) -> None:
        self.prefill_tokens_per_s = policy.observe_prefill_rate(
            self.prefill_tokens_per_s, num_tokens, elapsed_s
        )

    def _handoff(self, t: float, rep: _Replica, flight: _Flight) -> None:
        """The KV is in: import the prompt's full blocks, then decode from the prefill's token."""
        bs, prompt = rep.bm.block_size, flight.prompt_ids
        for i in range(flight.keys.num_blocks):
            key = flight.keys.get(i)
            if rep.bm.cached_block(key) is None:
                rep.bm.insert_cached_block(key, prompt[i * bs : (i + 1) * bs])
        flight.seq = self._sequence(flight.record.index, prompt, flight.req.num_decode_tokens)
        flight.seq.output_token_ids.append(0)
        if flight.req.num_decode_tokens == 1:  # the prefill's token was the whole answer
            self._tokens(flight, t, 1)
            flight.record.finish(flight.record.ttft_s, t - flight.req.arrived_at_s, 1)
            self._release(flight, rep, t)
            return
        flight.first_pending = True
        self._submit(t, rep, flight.seq)

    def _finish(self, rep: _Replica, flight: _Flight, t: float) -> None:
        rep.sched.finish(flight.seq, FinishReason.LENGTH)
        flight.record.finish(flight.record.ttft_s, t - flight.req.arrived_at_s, flight.num_tokens)
        self._release(flight, rep, t)

    def _release(self, flight: _Flight, rep: _Replica, t: float) -> None:
        self.inflight[rep.worker_id] -= 1
        # Still queued at the router: failed on the prefill worker, or before a local first token.
        never_started = flight.num_tokens == 0 and flight.plan.prefill is None
        if rep.role == "prefill" or never_started:
            self.queued_tokens[rep.worker_id] -= flight.plan.uncached_tokens
        if rep.role == "prefill" and self.config.overlap_handoff:  # its decode call ends too
            self.inflight[flight.plan.decode.worker_id] -= 1
        self.num_inflight -= 1
        del self.flights[str(flight.record.index)]

    # ---- fast-forward of pure-decode stretches ----

    def _start_stretch(self, rep: _Replica, t: float) -> bool:
        sched = rep.sched
        n = len(sched.running)
        if rep.role == "prefill" or sched.waiting or not n or n > sched.max_num_batched_tokens:
            return False
        steps, context = 1 << 30, 0
        for seq in sched.running:
            if seq.num_computed_tokens != seq.num_tokens - 1 or (
                seq.num_computed_tokens < seq.num_prompt_tokens
            ):
                return False
            if self.flights[seq.request_id].first_pending:
                return False
            steps = min(steps, seq.max_tokens - len(seq.output_token_ids))
            context += seq.num_computed_tokens
        steps = self._steps_that_fit(rep, steps)
        if steps < 2:
            return False
        j = np.arange(steps, dtype=float)
        ctx = context + j * n + n  # every sequence reads its context plus the new token
        durations = self.cost.step_s(StepShape(n, n, ctx, ctx))
        durations = np.broadcast_to(durations, j.shape)
        ends = t + np.cumsum(durations)
        rep.stretch = _Stretch(list(sched.running), durations, ends, steps)
        rep.stretch.record_started(rep.step_costs, t)
        rep.busy = True
        rep.version += 1
        self._push(float(ends[-1]), self._end_stretch, rep, rep.version)
        return True

    @staticmethod
    def _steps_that_fit(rep: _Replica, steps: int) -> int:
        """The most decode steps (<= ``steps``) whose new blocks the free pool covers."""
        bm, seqs = rep.bm, rep.sched.running
        free = bm.num_free_blocks

        def needed(k: int) -> int:
            return sum(max(0, bm.blocks_needed(s.num_computed_tokens + k) - len(s.block_table))
                       for s in seqs)  # fmt: skip

        if needed(steps) <= free:
            return steps
        lo, hi = 0, steps  # needed(lo) fits, needed(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if needed(mid) <= free else (lo, mid)
        return lo

    def _cut_stretch(self, rep: _Replica, t: float) -> None:
        """A sequence joined: the stretch ends with the step in flight at ``t``."""
        stretch = rep.stretch
        in_flight = int(np.searchsorted(stretch.ends_s, t, side="right"))
        keep = min(in_flight + 1, stretch.num_steps)
        if keep < stretch.num_steps:
            stretch.num_steps = keep
            rep.version += 1
            self._push(float(stretch.ends_s[keep - 1]), self._end_stretch, rep, rep.version)

    def _end_stretch(self, t: float, rep: _Replica, version: int) -> None:
        if version != rep.version:
            return
        stretch, rep.stretch = rep.stretch, None
        m, bm, ends = stretch.num_steps, rep.bm, stretch.ends_s
        stretch.record_started(rep.step_costs, t)
        for seq in stretch.seqs:
            bm.grow(seq, m)
            seq.num_computed_tokens += m
            seq.output_token_ids.extend([0] * m)
            if seq.num_computed_tokens // bm.block_size > len(seq.block_keys):
                bm.commit_full_blocks(seq)  # (a no-op otherwise: skip the call)
            flight = self.flights[seq.request_id]
            self._gaps.append(float(ends[0]) - flight.last_token_s)
            self._gap_weights.append(1)
            flight.num_tokens += m
            flight.last_token_s = t
        if m > 1:
            self._gap_blocks.append((np.diff(ends[:m]), len(stretch.seqs)))
        for seq in stretch.seqs:
            if len(seq.output_token_ids) >= seq.max_tokens:
                self._finish(rep, self.flights[seq.request_id], t)
        self._start_step(rep, t)

    # ---- output ----

    def result(self, conditions: dict | None = None) -> dict:
        gaps = [np.asarray(self._gaps)] + [g for g, _ in self._gap_blocks]
        weights = [np.asarray(self._gap_weights, dtype=float)]
        weights += [np.full(g.shape, w, dtype=float) for g, w in self._gap_blocks]
        return result.build(self.records, np.concatenate(gaps), np.concatenate(weights),
                            self.config.slo, "sim", conditions or self.conditions())  # fmt: skip

    def conditions(self) -> dict:
        c = self.config
        return {
            "cost_model": self.cost.name, "num_prefill": c.num_prefill, "num_decode": c.num_decode,
            "gpus_per_replica": self.cost.gpus_per_replica,
            "engine": asdict(self.cost.limits),
            "threshold_tokens": c.threshold_tokens, "staleness_s": c.staleness_s,
            "max_inflight_requests": c.max_inflight_requests,
        }  # fmt: skip


def _shape(plan: SchedulerPlan) -> StepShape:
    tokens = pairs = context = 0
    for c in plan.chunks:
        n = c.num_tokens
        tokens += n
        pairs += n * (c.start + (n + 1) / 2)
        context += c.start + n
    return StepShape(tokens, len(plan.chunks), pairs, context)


def simulate(workload: list[Request], config: SimConfig, cost: CostModel) -> dict:
    return Simulator(workload, config, cost).run()
