"""``pdserve plan``'s table, JSON and plot, and its live-stack advice (the search itself is
:mod:`pdserve.sim.plan`)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

from pdserve.sim.cluster import SimConfig
from pdserve.sim.plan import Outcome, Planner, scaling_advice, signals_from_metrics
from pdserve.sim.roofline import parse_gpu, parse_model, roofline
from pdserve.workload.format import Request
from pdserve.workload.generate import mean_rate_rps
from pdserve.workload.result import Slo


def run_plan(
    workload: list[Request],
    gpu_specs: list[str],
    model_spec: str,
    slo: Slo,
    attainment: float,
    max_replicas: int,
    out: Path | None,
    plot: Path | None,
    echo: Callable[[str], None],
    min_span_s: float = 60.0,
) -> list[dict]:
    model = parse_model(model_spec)
    rate = mean_rate_rps(workload)
    prompt_tokens = sum(r.num_prefill_tokens for r in workload) / len(workload)
    echo(f"plan: {len(workload)} requests at {rate:.2f} req/s, {model.name}, SLO TTFT <= "
         f"{slo.ttft_s}s and TPOT <= {slo.tpot_s}s for {attainment:.0%} of requests")  # fmt: skip
    rows, curves = [], {}
    for spec in gpu_specs:
        gpu = parse_gpu(spec)
        cost = roofline(gpu, model)
        base = SimConfig(0, 1, slo, overlap_handoff=True)  # the handoff as pdserve up runs it
        planner = Planner(workload, cost, gpu.price_per_hour, base, attainment, max_replicas,
                          min_span_s, log=echo)  # fmt: skip
        echo(f"{gpu.name} (${gpu.price_per_hour:.2f}/h, {cost.tp} GPU(s) per replica):")
        for mode, search in (("colocated", planner.colocated),
                             ("disaggregated", planner.disaggregated)):  # fmt: skip
            best = search()
            if best is None:
                rows.append({"gpu": gpu.name, "mode": mode, "config": None,
                             "why": f"no configuration up to {max_replicas} replicas meets the SLO"})  # fmt: skip
                continue
            goodput, capped, curve = planner.goodput_rps(best)
            curves[f"{gpu.name} {mode} {best.label}"] = curve
            rows.append(_row(gpu.name, mode, best, goodput, cost.tp) | {
                "goodput_is_lower_bound": capped,
                "prefill_load_replicas": rate * prompt_tokens / cost.prefill_tokens_per_s})  # fmt: skip
        echo(f"  ({planner.num_sims} simulations)")
    _explain(rows)
    echo(table(rows))
    done = [r for r in rows if r["config"]]
    if done:
        best = min(done, key=lambda r: r["cost_per_million_output_tokens"])
        echo(f"cheapest: {best['gpu']} {best['mode']} {best['config']}, "
             f"${best['cost_per_million_output_tokens']:.3f} per million output tokens")  # fmt: skip
    if out is not None:
        out.write_text(json.dumps({"rate_rps": rate, "model": model.name, "slo": vars(slo),
                                   "attainment": attainment, "rows": rows,
                                   "curves": curves}, indent=1) + "\n")  # fmt: skip
    if plot is not None:
        draw(rows, curves, rate, plot)
        echo(f"plot: {plot}")
    return rows


def _row(gpu: str, mode: str, best: Outcome, goodput: float, tp: int) -> dict:
    r = best.result
    return {
        "gpu": gpu, "mode": mode, "config": best.label, "num_prefill": best.num_prefill,
        "num_decode": best.num_decode, "tp": tp, "gpus": best.gpus,
        "price_per_hour": best.price_per_hour,
        "cost_per_million_output_tokens": best.cost_per_million_tokens,
        "goodput_rps": goodput, "goodput_per_gpu_rps": goodput / best.gpus,
        "slo_attainment": r["slo_attainment"], "ttft_p90_s": r["ttft_s"]["p90"],
        "tpot_p90_s": _tpot_p90(r), "pd_ratio": (f"{best.num_prefill}:{best.num_decode}"
                                                  if best.num_prefill else "-"),
    }  # fmt: skip


def _tpot_p90(result: dict) -> float | None:
    from pdserve.workload.result import quantiles

    tpots = [q["tpot_s"] for q in result["requests"] if q["tpot_s"] is not None]
    return quantiles(tpots)["p90"]


def _explain(rows: list[dict]) -> None:
    """Say per GPU which mode wins and by how much."""
    by_gpu: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_gpu.setdefault(row["gpu"], {})[row["mode"]] = row
    for modes in by_gpu.values():
        c, d = modes.get("colocated"), modes.get("disaggregated")
        if not (c and d and c["config"] and d["config"]):
            continue
        cheaper = min((c, d), key=lambda r: r["price_per_hour"])
        ratio = max(c["price_per_hour"], d["price_per_hour"]) / cheaper["price_per_hour"]
        verdict = (
            "same price per hour at this rate" if ratio == 1
            else f"{cheaper['mode']} is {ratio:.2f}x cheaper per hour at this rate"
        )  # fmt: skip
        d["why"] = c["why"] = (
            f"{verdict}; goodput per GPU {d['goodput_per_gpu_rps']:.2f} (disaggregated) vs "
            f"{c['goodput_per_gpu_rps']:.2f} (colocated) req/s; the prompts need "
            f"{d['prefill_load_replicas']:.2f} replicas' worth of prefill compute, which sets the "
            f"prefill pool, and TPOT and KV capacity set the decode pool ({d['pd_ratio']})"
        )


def table(rows: list[dict]) -> str:
    head = ("| GPU | mode | config (P:D) | GPUs | $/h | $/M output tok | goodput req/s | "
            "per GPU | TTFT p90 s | TPOT p90 s |\n|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    lines = [head]
    for r in rows:
        if r["config"] is None:
            lines.append(f"| {r['gpu']} | {r['mode']} | {r['why']} |  |  |  |  |  |  |  |")
            continue
        lines.append(
            f"| {r['gpu']} | {r['mode']} | {r['config']} ({r['pd_ratio']}) | {r['gpus']} | "
            f"{r['price_per_hour']:.2f} | {r['cost_per_million_output_tokens']:.3f} | "
            f"{'≥ ' if r['goodput_is_lower_bound'] else ''}{r['goodput_rps']:.2f} | "
            f"{'≥ ' if r['goodput_is_lower_bound'] else ''}{r['goodput_per_gpu_rps']:.2f} | "
            f"{r['ttft_p90_s']:.3f} | {r['tpot_p90_s'] or 0:.4f} |"
        )
    whys = sorted({f"- {r['gpu']}: {r['why']}" for r in rows if r.get("why") and r["config"]})
    if any(r.get("goodput_is_lower_bound") for r in rows):
        whys.append(
            "- ≥: goodput reached the rate cap (the sample must last the minimum span); a lower bound"
        )
    return "\n".join(lines + [""] + whys)


def draw(rows: list[dict], curves: dict, rate: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, curve in curves.items():
        left.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", ms=3, label=label)
    left.axvline(rate, color="grey", ls=":", label="workload rate")
    left.set(xlabel="arrival rate (req/s)", ylabel="SLO attainment", title="goodput vs rate")
    left.legend(fontsize=7)
    done = [r for r in rows if r["config"]]
    right.barh([f"{r['gpu']} {r['mode']} {r['config']}" for r in done],
               [r["cost_per_million_output_tokens"] for r in done])  # fmt: skip
    right.set(xlabel="$ per million output tokens", title="cost per configuration")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def advise_live(urls: list[str], echo: Callable[[str], None]) -> None:
    texts = []
    for url in urls:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (operator-given URL)
            texts.append(resp.read().decode())
    signals = signals_from_metrics(texts)
    advice = scaling_advice(signals)
    echo(f"live: {signals.num_prefill} prefill, {signals.num_decode} decode workers; "
         f"grow: {advice.grow} ({advice.reason})")  # fmt: skip
