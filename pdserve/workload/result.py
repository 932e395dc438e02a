"""RESULT.json: one shape for ``pdserve bench`` (measured) and ``pdserve sim`` (simulated), so
every figure can be compared field by field.

Top level: ``ttft_s``, ``itl_s``, ``e2e_s`` (each ``{"p50", "p90", "p99"}`` in seconds),
``output_tokens_per_s``, ``slo`` (the targets), ``slo_attainment`` (share of requests with
TTFT <= the TTFT target and mean inter-token gap (TPOT) <= the TPOT target; a failed request
misses), ``goodput_rps`` (requests meeting the SLO per second of the run), ``num_requests``,
``num_failed``, ``duration_s`` (first arrival to last token), ``source``, ``conditions`` and
``requests`` (one record per request, see :class:`RequestRecord`).

Percentiles use the inverted CDF (the smallest value with at least q of the weight at or
below it); ITL is over every inter-token gap of every request, weighted by how many tokens
saw that gap.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}


@dataclass
class RequestRecord:
    index: int  # position in the workload
    arrived_at_s: float  # from the workload's start
    num_prompt_tokens: int
    num_output_tokens: int  # tokens received (fewer than asked when it failed)
    ttft_s: float | None = None
    e2e_s: float | None = None
    tpot_s: float | None = None  # (e2e - ttft) / (output tokens - 1)
    route: str = ""  # "disaggregated" | "local" (sim); the router's route when it says
    error: str | None = None

    def finish(self, ttft_s: float, e2e_s: float, num_output_tokens: int) -> None:
        self.ttft_s, self.e2e_s, self.num_output_tokens = ttft_s, e2e_s, num_output_tokens
        if num_output_tokens > 1:
            self.tpot_s = (e2e_s - ttft_s) / (num_output_tokens - 1)


@dataclass(frozen=True)
class Slo:
    ttft_s: float = 2.0
    tpot_s: float = 0.2

    def met(self, r: RequestRecord) -> bool:
        if r.error is not None or r.ttft_s is None:
            return False
        return r.ttft_s <= self.ttft_s and (r.tpot_s is None or r.tpot_s <= self.tpot_s)


def quantiles(values: Sequence[float], weights: Sequence[float] | None = None) -> dict:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return {name: None for name in QUANTILES}
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=float)
    order = np.argsort(v, kind="stable")
    v, cum = v[order], np.cumsum(w[order])
    out = {}
    for name, q in QUANTILES.items():
        i = int(np.searchsorted(cum, q * cum[-1] - 1e-9 * cum[-1], side="left"))
        out[name] = float(v[min(i, v.size - 1)])
    return out


def build(
    records: list[RequestRecord],
    itl_gaps_s: Sequence[float],
    itl_weights: Sequence[float] | None,
    slo: Slo,
    source: str,
    conditions: dict,
) -> dict:
    done = [r for r in records if r.error is None and r.e2e_s is not None]
    ends = [r.arrived_at_s + r.e2e_s for r in done]
    start = min((r.arrived_at_s for r in records), default=0.0)
    duration_s = max(ends, default=start) - start
    num_tokens = sum(r.num_output_tokens for r in records)
    num_good = sum(slo.met(r) for r in records)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    return {
        "source": source,
        "conditions": conditions,
        "ttft_s": quantiles([r.ttft_s for r in done]),
        "itl_s": quantiles(itl_gaps_s, itl_weights),
        "e2e_s": quantiles([r.e2e_s for r in done]),
        "output_tokens_per_s": per_s(num_tokens),
        "slo": asdict(slo),
        "slo_attainment": num_good / len(records) if records else 0.0,
        "goodput_rps": per_s(num_good),
        "num_requests": len(records),
        "num_failed": len(records) - len(done),
        "duration_s": duration_s,
        "requests": [dict(vars(r)) for r in records],  # (scalar fields: asdict's deep copy is slow)
    }


def write(path: str | Path, result: dict) -> None:
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


def headline(result: dict) -> str:
    ms = lambda q: "-" if q is None else f"{q * 1000:.1f}"  # noqa: E731
    t, i = result["ttft_s"], result["itl_s"]
    return (
        f"{result['num_requests']} requests ({result['num_failed']} failed) in "
        f"{result['duration_s']:.1f}s: TTFT p50/p90/p99 {ms(t['p50'])}/{ms(t['p90'])}/"
        f"{ms(t['p99'])} ms, ITL p50/p90 {ms(i['p50'])}/{ms(i['p90'])} ms, "
        f"{result['output_tokens_per_s']:.1f} output tok/s, SLO attainment "
        f"{result['slo_attainment']:.1%}, goodput {result['goodput_rps']:.3f} req/s"
    )
