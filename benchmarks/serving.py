"""Serving benchmark: one seeded workload against the in-process engine, the disaggregated
stack and the colocated stack, in one run.

Workload: Poisson arrivals at ``--rate`` requests/s; prompt lengths mixed (70 % short,
32-128 tokens; 30 % long, 384-768 tokens), output lengths 16-48 tokens, ``--shared-share`` of
the prompts starting with one shared 256-token system prefix. Greedy decoding, EOS ignored, so
every target produces exactly the same number of tokens.

Targets:
- engine: the offline LLMEngine in this process (requests join its batch at their arrival).
- disaggregated: ``pdserve up --prefill 1 --decode 1`` with prefill and decode pinned to
  different cores (when the machine has two or more).
- colocated: ``pdserve up --prefill 0 --decode 1`` (the decode worker prefills locally),
  on all the cores the disaggregated stack uses.

Reports TTFT, ITL and end-to-end p50/p90/p99, output throughput, and goodput (requests/s
meeting TTFT <= --slo-ttft-s and mean ITL <= --slo-itl-s), plus a handoff probe: TTFT of
one 512-token prompt on the idle disaggregated stack, disaggregated vs prefilled locally.

    .venv/bin/python benchmarks/serving.py --num-requests 32 --rate 1.0 --out benchmarks/serving
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Req:
    arrival_s: float
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class Result:
    ttft_s: float = 0.0
    itls_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    num_tokens: int = 0
    ok: bool = True


def make_workload(tokenizer, n: int, rate: float, shared_share: float, seed: int) -> list[Req]:
    rng = random.Random(seed)
    vocab_text = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "was",
        "for",
        "on",
        "that",
        "with",
        "as",
        "by",
        "at",
        "from",
        "his",
        "her",
        "an",
        "were",
        "are",
        "which",
        "this",
        "be",
        "or",
        "had",
        "not",
        "but",
        "their",
        "one",
        "all",
        "been",
        "has",
        "have",
        "more",
        "time",
        "there",
        "can",
        "new",
        "first",
    ]
    shared = tokenizer.encode(" ".join(rng.choice(vocab_text) for _ in range(400)))[:256]
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        length = rng.randint(32, 128) if rng.random() < 0.7 else rng.randint(384, 768)
        words = " ".join(rng.choice(vocab_text) for _ in range(length * 2))
        ids = tokenizer.encode(words)
        if rng.random() < shared_share:
            ids = shared + ids
        out.append(Req(t, ids[: max(length, len(shared) + 16) if ids[:1] == shared[:1] else length],
                       rng.randint(16, 48)))  # fmt: skip
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(
    name: str, results: list[Result], wall_s: float, slo_ttft: float, slo_itl: float
) -> dict:
    ok = [r for r in results if r.ok]
    itls = [x for r in ok for x in r.itls_s]
    good = [
        r
        for r in ok
        if r.ttft_s <= slo_ttft and (not r.itls_s or statistics.mean(r.itls_s) <= slo_itl)
    ]
    tokens = sum(r.num_tokens for r in ok)
    row = {"target": name, "requests": len(results), "failed": len(results) - len(ok),
           "wall_s": round(wall_s, 2), "output_tok_per_s": round(tokens / wall_s, 1),
           "goodput_req_per_s": round(len(good) / wall_s, 3)}  # fmt: skip
    for label, values in (
        ("ttft", [r.ttft_s for r in ok]),
        ("itl", itls),
        ("e2e", [r.e2e_s for r in ok]),
    ):
        for q in (50, 90, 99):
            row[f"{label}_p{q}_ms"] = round(pct(values, q) * 1000, 1)
    return row


# ---- targets ----


def run_engine(workload: list[Req], threads: int) -> tuple[list[Result], float]:
    import torch

    from pdserve.engine.engine_config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams

    torch.set_num_threads(threads)
    engine = LLMEngine(EngineConfig(kv_cache_bytes=1 << 30))
    engine.generate([workload[0].prompt_ids[:16]], SamplingParams(max_tokens=2))  # warm-up
    results = [Result() for _ in workload]
    rid_to_idx: dict[str, int] = {}
    last: dict[int, float] = {}
    pending = list(enumerate(workload))
    start = time.perf_counter()
    while pending or engine.has_unfinished:
        now = time.perf_counter() - start
        while pending and pending[0][1].arrival_s <= now:
            i, req = pending.pop(0)
            params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)
            rid_to_idx[engine.add_request(req.prompt_ids, params)] = i
        if not engine.has_unfinished:
            time.sleep(min(0.01, max(0.0, pending[0][1].arrival_s - now)))
            continue
        for out in engine.step():
            i = rid_to_idx[out.request_id]
            t = time.perf_counter() - start
            r = results[i]
            if r.num_tokens == 0:
                r.ttft_s = t - workload[i].arrival_s
            else:
                r.itls_s.append(t - last[i])
            last[i] = t
            r.num_tokens += len(out.new_token_ids)
            if out.finished:
                r.e2e_s = t - workload[i].arrival_s
    return results, time.perf_counter() - start


async def _drive(address: str, workload: list[Req]) -> tuple[list[Result], float]:
    from pdserve.client import AsyncClient

    results = [Result() for _ in workload]

    async def one(i: int, req: Req, client, start: float) -> None:
        await asyncio.sleep(max(0.0, start + req.arrival_s - time.perf_counter()))
        sent = time.perf_counter()
        r, last = results[i], sent
        try:
            async for chunk in client.stream(req.prompt_ids, max_tokens=req.max_tokens,
                                             temperature=0.0, ignore_eos=True):  # fmt: skip
                now = time.perf_counter()
                if not chunk.token_ids:
                    continue
                if r.num_tokens == 0:
                    r.ttft_s = now - sent
                else:
                    r.itls_s.extend([(now - last) / len(chunk.token_ids)] * len(chunk.token_ids))
                last = now
                r.num_tokens += len(chunk.token_ids)
            r.e2e_s = time.perf_counter() - sent
        except Exception as exc:  # a failed request counts against goodput
            r.ok = False
            print(f"  request {i} failed: {exc}")

    async with AsyncClient(address, timeout_s=600) as client:
        await client.generate([1, 2, 3, 4], max_tokens=2)  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(one(i, r, client, start) for i, r in enumerate(workload)))
        return results, time.perf_counter() - start


async def _ttft_once(address: str, prompt_ids: list[int]) -> float:
    from pdserve.client import AsyncClient

    async with AsyncClient(address, timeout_s=600) as client:
        sent = time.perf_counter()
        async for _chunk in client.stream(prompt_ids, max_tokens=1, temperature=0.0):
            return time.perf_counter() - sent
    return float("nan")


def run_stack(workload, num_prefill: int, affinity: list[str], threads: dict[str, int],
              handoff_probe: list[int] | None) -> tuple[list[Result], float, dict]:  # fmt: skip
    from pdserve.launcher import Stack, StackConfig, parse_cpu_affinity

    env = {f"PDSERVE_{role.upper()}_NUM_THREADS": str(n) for role, n in threads.items()}
    env["PDSERVE_LOG_LEVEL"] = "warning"
    probe: dict = {}
    config = StackConfig(num_prefill=num_prefill, num_decode=1, default_ports=False, env=env,
                         cpu_affinity=parse_cpu_affinity(affinity), cluster_name="bench")  # fmt: skip
    with Stack(config) as stack:
        if handoff_probe is not None:
            ttfts = [
                asyncio.run(_ttft_once(stack.grpc_address, [7 + i] + handoff_probe))
                for i in range(3)
            ]
            probe["disaggregated_ttft_ms"] = round(statistics.median(ttfts) * 1000, 1)
        results, wall = asyncio.run(_drive(stack.grpc_address, workload))
    return results, wall, probe


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--rate", type=float, default=1.0, help="mean arrivals per second")
    ap.add_argument("--shared-share", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo-ttft-s", type=float, default=2.0)
    ap.add_argument("--slo-itl-s", type=float, default=0.2)
    ap.add_argument("--targets", default="engine,disaggregated,colocated")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/serving"))
    args = ap.parse_args()

    from pdserve.model.loader import load_checkpoint

    tokenizer = load_checkpoint(None).tokenizer
    workload = make_workload(tokenizer, args.num_requests, args.rate, args.shared_share, args.seed)
    cpus = sorted(os.sched_getaffinity(0))
    split = len(cpus) >= 2
    p_cpus = cpus[: len(cpus) // 2] if split else cpus
    d_cpus = cpus[len(cpus) // 2 :] if split else cpus
    spec = lambda c: ",".join(map(str, c))  # noqa: E731
    probe_ids = tokenizer.encode(" ".join(["history"] * 600))[:511]
    rows, probes = [], {}
    for target in args.targets.split(","):
        print(f"running {target} ...", flush=True)
        if target == "engine":
            results, wall = run_engine(workload, len(cpus))
        elif target == "disaggregated":
            results, wall, probe = run_stack(
                workload, 1, [f"prefill={spec(p_cpus)}", f"decode={spec(d_cpus)}"],
                {"prefill": len(p_cpus), "decode": len(d_cpus)}, probe_ids,
            )  # fmt: skip
            probes.update(probe)
        elif target == "colocated":
            results, wall, probe = run_stack(
                workload, 0, [f"decode={spec(cpus)}"], {"decode": len(cpus)}, probe_ids
            )
            probes["colocated_ttft_ms"] = probe.get("disaggregated_ttft_ms")
        else:
            raise SystemExit(f"unknown target {target!r}")
        rows.append(summarize(target, results, wall, args.slo_ttft_s, args.slo_itl_s))
        print(json.dumps(rows[-1]), flush=True)
    report(rows, probes, args, len(cpus))


def report(rows: list[dict], probes: dict, args, num_cpus: int) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    conditions = (f"SmolLM2-135M-Instruct float32, CPU x{num_cpus} ({platform.processor() or platform.machine()}), "
                  f"{args.num_requests} requests, Poisson {args.rate}/s, seed {args.seed}, "
                  f"SLO TTFT<={args.slo_ttft_s}s ITL<={args.slo_itl_s}s")  # fmt: skip
    (args.out / "results.json").write_text(json.dumps({"conditions": conditions, "rows": rows,
                                                       "handoff_probe_512": probes}, indent=2))  # fmt: skip
    by = {r["target"]: r for r in rows}
    head = " | ".join(f"{t}: TTFT p50 {r['ttft_p50_ms']} ms, ITL p99 {r['itl_p99_ms']} ms, "
                      f"{r['output_tok_per_s']} tok/s" for t, r in by.items())  # fmt: skip
    print(f"serving [{conditions}] {head}; 512-token TTFT probe {probes}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, metric in zip(axes, ("ttft", "itl", "e2e"), strict=True):
        for i, row in enumerate(rows):
            values = [row[f"{metric}_p{q}_ms"] for q in (50, 90, 99)]
            ax.bar([x + i * 0.25 for x in range(3)], values, width=0.25, label=row["target"])
        ax.set_xticks([x + 0.25 for x in range(3)], ["p50", "p90", "p99"])
        ax.set_title(f"{metric.upper()} (ms)")
    axes[0].legend()
    fig.suptitle(conditions, fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "serving.png", dpi=110)
    print(f"plot: {args.out / 'serving.png'}")


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
