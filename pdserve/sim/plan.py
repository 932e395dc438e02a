"""``pdserve plan``: the cheapest pool sizes and GPU type that meet a TTFT/TPOT SLO at a
workload's rate, colocated and disaggregated side by side, found with the simulator.

Search, per GPU type: the fewest colocated replicas K that meet the SLO (exponential search
then bisection on K); for disaggregated, for each prefill pool size N the fewest decode
replicas M (bisection), keeping the cheapest N + M. "Meets the SLO" means SLO attainment >=
``attainment`` (DistServe's 90 %). For each chosen configuration, goodput is the highest
arrival rate (the workload's arrival times compressed or stretched) that still meets it, found
by bisection. Cost per million output tokens is the pool's price per hour over the output
tokens per hour it serves at the workload's rate.

Scaling advice from a live stack: :func:`scaling_advice` reads the services' own metrics (queue
depths per role, KV usage) and names the pool to grow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from pdserve.sim.cluster import SimConfig, simulate
from pdserve.sim.costs import CostModel
from pdserve.workload.format import Request


@dataclass(frozen=True)
class Outcome:
    num_prefill: int
    num_decode: int
    gpus: int
    price_per_hour: float
    result: dict = field(repr=False)

    @property
    def cost_per_million_tokens(self) -> float:
        tokens_per_hour = self.result["output_tokens_per_s"] * 3600
        return self.price_per_hour / tokens_per_hour * 1e6 if tokens_per_hour else math.inf

    @property
    def label(self) -> str:
        return f"{self.num_decode} colocated" if self.num_prefill == 0 else (
            f"{self.num_prefill}P+{self.num_decode}D")  # fmt: skip


@dataclass
class Planner:
    workload: list[Request]
    cost: CostModel
    gpu_price_per_hour: float
    base: SimConfig
    attainment: float = 0.9
    max_replicas: int = 32
    min_span_s: float = 60.0  # the shortest a compressed sample may last (see goodput_rps)
    log: Callable[[str], None] = lambda _line: None
    num_sims: int = 0

    def run(self, num_prefill: int, num_decode: int, workload: list[Request] | None = None):
        self.num_sims += 1
        config = replace(self.base, num_prefill=num_prefill, num_decode=num_decode)
        res = simulate(workload or self.workload, config, self.cost)
        gpus = (num_prefill + num_decode) * self.cost.gpus_per_replica
        out = Outcome(num_prefill, num_decode, gpus, gpus * self.gpu_price_per_hour, res)
        self.log(f"  {out.label:>14} x{self.cost.gpus_per_replica} GPU: attainment "
                 f"{res['slo_attainment']:.1%}")  # fmt: skip
        return out

    def meets(self, out: Outcome) -> bool:
        return out.result["slo_attainment"] >= self.attainment

    def fewest(self, make: Callable[[int], Outcome], low: int = 1) -> Outcome | None:
        """The smallest n >= low with make(n) meeting the SLO (assumed monotone in n)."""
        n, failed, best = low, low - 1, None
        while best is None:
            out = make(n)
            if self.meets(out):
                best = out
            elif n >= self.max_replicas:
                return None
            else:
                failed, n = n, min(n * 2, self.max_replicas)
        low, high = failed + 1, n  # make(failed) misses, make(n) meets
        while low < high:
            mid = (low + high) // 2
            out = make(mid)
            if self.meets(out):
                best, high = out, mid
            else:
                low = mid + 1
        return best

    def colocated(self) -> Outcome | None:
        return self.fewest(lambda k: self.run(0, k))

    def disaggregated(self) -> Outcome | None:
        best: Outcome | None = None
        for n in range(1, self.max_replicas):
            if best is not None and n + 1 > best.num_prefill + best.num_decode:
                break
            out = self.fewest(lambda m, n=n: self.run(n, m))
            if out is not None and (best is None or out.gpus < best.gpus):
                best = out
        return best

    def goodput_rps(self, out: Outcome, iterations: int = 5) -> tuple[float, bool, list]:
        """(the highest mean arrival rate meeting the SLO, whether it hit the sample's cap,
        (rate, attainment) samples). A finite sample compressed too far is one burst that a big
        batch swallows whole, so rates are capped where the sample would last less than
        ``min_span_s``; a goodput at the cap is a lower bound."""
        from pdserve.workload.generate import at_rate, mean_rate_rps

        rate0 = mean_rate_rps(self.workload)
        cap = max(rate0, len(self.workload) / self.min_span_s)
        curve: list[tuple[float, float]] = []

        def attain(rate: float) -> float:
            res = self.run(out.num_prefill, out.num_decode, at_rate(self.workload, rate)).result
            curve.append((rate, res["slo_attainment"]))
            return res["slo_attainment"]

        low, high = rate0, min(cap, rate0 * 2)
        while high < cap and attain(high) >= self.attainment:
            low, high = high, min(cap, high * 2)
        if high >= cap and attain(cap) >= self.attainment:
            return cap, True, sorted(curve)
        for _ in range(iterations):
            mid = (low + high) / 2
            low, high = (mid, high) if attain(mid) >= self.attainment else (low, mid)
        return low, False, sorted(curve)


# ---- scaling advice from a live stack's metrics ----


@dataclass(frozen=True)
class PoolSignals:
    """What the services export (``pdserve_queue_depth_requests``, ``pdserve_kv_cache_usage_ratio``)."""

    num_prefill: int
    num_decode: int
    prefill_waiting: float
    decode_waiting: float  # waiting + fetching KV
    decode_kv_usage: float  # the fullest decode worker's KV pool share
    router_admitted: float = 0.0


@dataclass(frozen=True)
class Advice:
    grow: str  # "prefill" | "decode" | "none"
    reason: str


def scaling_advice(s: PoolSignals, kv_high: float = 0.9, queue_per_worker: float = 1.0) -> Advice:
    """Grow decode when its KV pool is nearly full or requests queue at decode; else grow
    prefill when prompts queue at prefill (or, colocated, nothing to split)."""
    per_decode = s.decode_waiting / max(1, s.num_decode)
    per_prefill = s.prefill_waiting / max(1, s.num_prefill)
    if s.decode_kv_usage >= kv_high:
        return Advice("decode", f"decode KV pool {s.decode_kv_usage:.0%} full (>= {kv_high:.0%})")
    if per_decode >= queue_per_worker and per_decode >= per_prefill:
        return Advice("decode", f"{per_decode:.1f} requests waiting per decode worker "
                                f"(prefill: {per_prefill:.1f})")  # fmt: skip
    if s.num_prefill and per_prefill >= queue_per_worker:
        return Advice("prefill", f"{per_prefill:.1f} prompts waiting per prefill worker "
                                 f"(decode: {per_decode:.1f})")  # fmt: skip
    return Advice(
        "none",
        f"no pool is saturated (waiting per prefill worker {per_prefill:.1f}, "
        f"per decode worker {per_decode:.1f}, decode KV {s.decode_kv_usage:.0%})",
    )


def signals_from_metrics(texts: list[str]) -> PoolSignals:
    """Sum the scraped ``/metrics`` pages of a stack's services into PoolSignals; a page's
    role is read from the queue labels it exports."""
    from prometheus_client.parser import text_string_to_metric_families

    num = {"prefill": 0, "decode": 0}
    queues: dict[str, float] = {}
    kv_usage = 0.0
    for text in texts:
        page_queues: dict[str, float] = {}
        page_kv = None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "pdserve_queue_depth_requests":
                    page_queues[sample.labels.get("queue", "")] = sample.value
                elif sample.name == "pdserve_kv_cache_usage_ratio":
                    page_kv = sample.value
        role = ("prefill" if "prefill_waiting" in page_queues
                else "decode" if "decode_waiting" in page_queues else None)  # fmt: skip
        if role is not None:
            num[role] += 1
        if role == "decode" and page_kv is not None:
            kv_usage = max(kv_usage, page_kv)
        for name, value in page_queues.items():
            queues[name] = queues.get(name, 0.0) + value
    return PoolSignals(
        num["prefill"], num["decode"], queues.get("prefill_waiting", 0.0),
        queues.get("decode_waiting", 0.0) + queues.get("decode_kv_fetching", 0.0), kv_usage,
        queues.get("router_admitted", 0.0),
    )  # fmt: skip
