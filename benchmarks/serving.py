"""Serving benchmark: one seeded workload replayed with ``pdserve bench`` against the
disaggregated and the colocated stack, in one run.

Workload (``pdserve.workload``): Poisson arrivals at ``--rate`` requests/s; prompt lengths
mixed (70 % short, 32-128 tokens; 30 % long, 384-768 tokens), output lengths 16-48 tokens,
``--shared-share`` of the prompts starting with one shared 256-token system prefix. Greedy
decoding, EOS ignored (``pdserve bench`` does both), so both stacks produce the same tokens.

Targets (``--targets``, comma-separated; the default runs all but disaggregated-strict):
- disaggregated: ``pdserve up --prefill 1 --decode 1`` with prefill and decode pinned to
  different cores (when the machine has two or more), the router's default policy (``cost``:
  a prompt is prefilled where its first token is predicted sooner, so the decode worker
  computes short prompts and some long ones itself), the decode worker's steps capped at
  64 tokens (``pdserve up``'s default beside prefill workers).
- disaggregated-strict: the same stack, every prompt prefilled on the prefill worker (router
  ``disaggregation_policy=threshold``, ``disagg_threshold_tokens=0``).
- disaggregated-chunkN: the same, the decode worker's steps capped at N tokens
  (``max_num_batched_tokens``); disaggregated-chunk512 is the engine's default budget, as
  ``pdserve up`` ran before its cap: a prompt the decode worker computes itself then stretches
  its running streams' steps up to four times as long.
- colocated: ``pdserve up --prefill 0 --decode 1`` (the decode worker prefills locally),
  on all the cores the disaggregated stack uses.

``--set PDSERVE_VAR=VALUE`` adds a setting to every target's stack; ``--step-logs DIR`` has each
worker write its engine steps (``step_log_path``) to ``DIR/steps-TARGET-ROLE.jsonl``.

Each target's RESULT.json (``pdserve bench --out``) is kept next to the summary; the table
prints TTFT, ITL and end-to-end p50/p90/p99, output throughput and goodput (requests/s meeting
TTFT <= --slo-ttft-s and TPOT <= --slo-tpot-s), plus a handoff probe: TTFT of a 512-token
prompt on each idle stack (``pdserve bench`` on three such requests, 3 s apart).

    .venv/bin/python benchmarks/serving.py --num-requests 64 --rate 2.0 \
        --targets disaggregated,disaggregated-chunk512,colocated --out benchmarks/serving
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine_info import cpu_model  # noqa: E402
from pdserve.launcher import Stack, StackConfig, parse_cpu_affinity  # noqa: E402
from pdserve.workload.format import Request, save  # noqa: E402
from pdserve.workload.generate import Lengths, synthetic  # noqa: E402


def bench(address: str, workload: Path, out: Path, args) -> dict:
    """One ``pdserve bench`` run: the command users run, so this measures what they get."""
    cmd = [sys.executable, "-m", "pdserve.cli", "bench", str(workload), "--url", address,
           "--out", str(out), "--slo-ttft-s", str(args.slo_ttft_s),
           "--slo-tpot-s", str(args.slo_tpot_s), "--seed", str(args.seed)]  # fmt: skip
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


# Each target: its number of prefill workers and its settings on top of ``pdserve up``'s.
TARGETS: dict[str, tuple[int, dict[str, str]]] = {
    "disaggregated": (1, {}),
    "disaggregated-strict": (1, {  # every prompt prefilled on the prefill worker
        "PDSERVE_ROUTER_DISAGGREGATION_POLICY": "threshold",
        "PDSERVE_ROUTER_DISAGG_THRESHOLD_TOKENS": "0",
    }),
    "colocated": (0, {}),
}  # fmt: skip
CHUNK_TARGET = "disaggregated-chunk"  # + N: the decode worker's steps capped at N tokens


def target_settings(target: str) -> tuple[int, dict[str, str]]:
    """A target's number of prefill workers and settings (``TARGETS`` or ``CHUNK_TARGET`` N)."""
    if target in TARGETS:
        return TARGETS[target]
    budget = target.removeprefix(CHUNK_TARGET)
    if target.startswith(CHUNK_TARGET) and budget.isdigit() and int(budget) >= 1:
        return 1, {"PDSERVE_DECODE_MAX_NUM_BATCHED_TOKENS": budget}
    raise ValueError(f"unknown target {target!r} (known: {', '.join(TARGETS)}, {CHUNK_TARGET}N)")


def stack_config(target: str, cpus: list[int], settings: dict[str, str],
                 step_logs: Path | None) -> StackConfig:  # fmt: skip
    """The stack of one target on ``cpus``: a prefill worker on the first half and the decode
    worker on the second (when there are two or more), else the decode worker on all of them;
    ``settings`` (``--set``) over the target's own; each worker's step log in ``step_logs``."""
    num_prefill, target_env = target_settings(target)
    spec = lambda c: ",".join(map(str, c))  # noqa: E731
    if num_prefill and len(cpus) >= 2:
        p_cpus, d_cpus = cpus[: len(cpus) // 2], cpus[len(cpus) // 2 :]
        affinity, threads = [f"prefill={spec(p_cpus)}", f"decode={spec(d_cpus)}"], {
            "prefill": len(p_cpus), "decode": len(d_cpus)}  # fmt: skip
    else:
        affinity, threads = [f"decode={spec(cpus)}"], {"decode": len(cpus), "prefill": len(cpus)}
    env = {f"PDSERVE_{role.upper()}_NUM_THREADS": str(n) for role, n in threads.items()}
    env["PDSERVE_LOG_LEVEL"] = "warning"
    env.update(target_env)
    env.update(settings)
    if step_logs is not None:  # each worker's engine steps, one JSON line each
        for role in threads:
            env[f"PDSERVE_{role.upper()}_STEP_LOG_PATH"] = str(
                (step_logs / f"steps-{target}-{role}.jsonl").resolve()
            )
    return StackConfig(num_prefill=num_prefill, num_decode=1, default_ports=False, env=env,
                       cpu_affinity=parse_cpu_affinity(affinity), cluster_name="bench")  # fmt: skip


def run_stack(target: str, args, workload: Path, probe: Path) -> tuple[dict, dict]:
    config = stack_config(target, sorted(os.sched_getaffinity(0)), args.set, args.step_logs)
    for name, value in config.env.items():
        if name.endswith("_STEP_LOG_PATH"):
            Path(value).unlink(missing_ok=True)  # a log of this run only
    with Stack(config) as stack:
        probe_res = bench(stack.grpc_address, probe, args.out / f"probe-{target}.json", args)
        res = bench(stack.grpc_address, workload, args.out / f"result-{target}.json", args)
    return res, probe_res


def row(target: str, res: dict) -> dict:
    out = {"target": target, "requests": res["num_requests"], "failed": res["num_failed"],
           "wall_s": round(res["duration_s"], 2),
           "output_tok_per_s": round(res["output_tokens_per_s"], 1),
           "goodput_req_per_s": round(res["goodput_rps"], 3),
           "met_slo": round(res["slo_attainment"] * res["num_requests"]),
           "routes": dict(Counter(r["route"] or "unknown" for r in res["requests"]))}  # fmt: skip
    for metric in ("ttft", "itl", "e2e"):
        for q in ("p50", "p90", "p99"):
            value = res[f"{metric}_s"][q]
            out[f"{metric}_{q}_ms"] = None if value is None else round(value * 1000, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second")
    ap.add_argument("--shared-share", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo-ttft-s", type=float, default=2.0)
    ap.add_argument("--slo-tpot-s", type=float, default=0.2)
    ap.add_argument(
        "--targets",
        default="disaggregated,disaggregated-chunk512,colocated",
        help=", ".join([*TARGETS, f"{CHUNK_TARGET}N"]),
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/serving"))
    ap.add_argument("--step-logs", type=Path, default=None,
                    help="write each worker's step log (step_log_path) to DIR/steps-TARGET-ROLE.jsonl")  # fmt: skip
    ap.add_argument("--set", action="append", default=[], metavar="PDSERVE_VAR=VALUE",
                    help="a setting for every target's stack (repeatable)")  # fmt: skip
    args = ap.parse_args()
    args.set = dict(_setting(a) for a in args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step_logs is not None:
        args.step_logs.mkdir(parents=True, exist_ok=True)
    workload = args.out / "workload.jsonl"
    save(workload, synthetic(
        args.num_requests, args.rate, Lengths("0.7*uniform:32:128+0.3*uniform:384:768"),
        Lengths("uniform:16:48"), shared_prefix_tokens=256, shared_share=args.shared_share,
        seed=args.seed,
    ))  # fmt: skip
    probe = args.out / "probe.jsonl"
    save(probe, [Request(3.0 * i, 512, 1) for i in range(3)])
    rows, probes = [], {}
    started = time.gmtime(), os.getloadavg()[0]
    targets = args.targets.split(",")
    for target in targets:  # every name checked before the first stack starts
        try:
            target_settings(target)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    for target in targets:
        print(f"running {target} ...", flush=True)
        res, probe_res = run_stack(target, args, workload, probe)
        rows.append(row(target, res))
        probes[f"{target}_ttft_ms"] = round(probe_res["ttft_s"]["p50"] * 1000, 1)
        print(json.dumps(rows[-1]), flush=True)
    report(rows, probes, args, len(os.sched_getaffinity(0)), started)


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("PDSERVE_"):
        raise SystemExit(f"--set wants PDSERVE_VAR=VALUE, got {text!r}")
    return name, value


def report(rows: list[dict], probes: dict, args, num_cpus: int, started) -> None:
    start_utc, start_load = started
    conditions = (f"SmolLM2-135M-Instruct, quantization auto (the engine default), {cpu_model()} x{num_cpus}, "
                  f"{args.num_requests} requests, Poisson {args.rate}/s, seed {args.seed}, "
                  f"SLO TTFT<={args.slo_ttft_s}s TPOT<={args.slo_tpot_s}s, "
                  f"started {time.strftime('%Y-%m-%d %H:%M UTC', start_utc)}, "
                  f"load avg 1m {start_load:.2f} at start, {os.getloadavg()[0]:.2f} at end"
                  + "".join(f", {k}={v}" for k, v in args.set.items()))  # fmt: skip
    (args.out / "results.json").write_text(json.dumps({"conditions": conditions, "rows": rows,
                                                       "handoff_probe_512": probes}, indent=2))  # fmt: skip
    head = " | ".join(f"{r['target']}: TTFT p50 {r['ttft_p50_ms']} ms, ITL p99 {r['itl_p99_ms']} ms, "
                      f"{r['output_tok_per_s']} tok/s" for r in rows)  # fmt: skip
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
        for i, r in enumerate(rows):
            values = [r[f"{metric}_p{q}_ms"] or 0 for q in (50, 90, 99)]
            ax.bar([x + i * 0.3 for x in range(3)], values, width=0.3, label=r["target"])
        ax.set_xticks([x + 0.15 for x in range(3)], ["p50", "p90", "p99"])
        ax.set_title(f"{metric.upper()} (ms)")
    axes[0].legend()
    fig.suptitle(conditions, fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "serving.png", dpi=110)
    print(f"plot: {args.out / 'serving.png'}")


if __name__ == "__main__":
    main()
