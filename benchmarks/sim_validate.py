"""Validation of ``pdserve sim`` against ``pdserve bench`` on this machine.

The same seeded workloads (Poisson arrivals, prompts uniform 32-640 tokens so that the router
sends some to the prefill worker and prefills others locally, outputs 16-48 tokens) run live
on a ``pdserve up`` stack (disaggregated: prefill pinned to CPU 0, decode to CPU 1; colocated:
one decode worker on CPU 1; one torch thread each) and in the simulator with the calibrated
profile measured on the same machine just before (engine steps on CPU 1, dispatch and handoff
on the idle disaggregated stack). Target: TTFT p50/p90 and ITL p50 within 15 %, at two loads,
for both stacks. Prints the table and writes benchmarks/sim_validation/.

    .venv/bin/python benchmarks/sim_validate.py [--num-requests 40 --rates 0.3,1.0]

Another process on the same cores moves the live figures and not the simulated ones: the
1-minute load average is recorded before and after every live run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pdserve.launcher import Stack, StackConfig, parse_cpu_affinity  # noqa: E402
from pdserve.sim.cluster import SimConfig, Simulator  # noqa: E402
from pdserve.sim.costs import load_profile  # noqa: E402
from pdserve.workload import result  # noqa: E402
from pdserve.workload.bench import replay, target_for  # noqa: E402
from pdserve.workload.format import save  # noqa: E402
from pdserve.workload.generate import Lengths, synthetic  # noqa: E402

MODES = {"disaggregated": (1, ["prefill=0", "decode=1"]), "colocated": (0, ["decode=1"])}
COMPARED = (("ttft_s", "p50"), ("ttft_s", "p90"), ("itl_s", "p50"))
TOLERANCE = 0.15
# Unquantized float32 weights on both sides: the figures compare the simulator with the engine
# it models, whatever the engine's default weight mode.
QUANTIZATION = "none"


def make_workload(num_requests: int, rate: float, seed: int):
    return synthetic(num_requests, rate, Lengths("uniform:32:640"), Lengths("uniform:16:48"),
                     seed=seed)  # fmt: skip


def stack_config(mode: str, name: str) -> StackConfig:
    num_prefill, affinity = MODES[mode]
    env = {"PDSERVE_PREFILL_NUM_THREADS": "1", "PDSERVE_DECODE_NUM_THREADS": "1",
           "PDSERVE_LOG_LEVEL": "warning", **{f"PDSERVE_{role}_QUANTIZATION": QUANTIZATION
                                              for role in ("PREFILL", "DECODE", "KVSTORE")}}  # fmt: skip
    return StackConfig(num_prefill=num_prefill, num_decode=1, default_ports=False, env=env,
                       cpu_affinity=parse_cpu_affinity(affinity), cluster_name=name)  # fmt: skip


def live(stack: Stack, workload, slo: result.Slo, conditions: dict, prompt_seed: int) -> dict:
    """``prompt_seed`` differs per run: one stack serves both loads, and a prompt it has seen
    would be a prefix-cache hit the (cold) simulation does not have."""

    async def go():
        target = target_for(stack.grpc_address, 600)
        try:
            await replay(workload[:2], target, seed=-1)  # warm-up: other prompts, no cache hits
            return await replay(workload, target, seed=prompt_seed)
        finally:
            await target.close()

    load_before = os.getloadavg()[0]
    records, gaps, weights = asyncio.run(go())
    conditions = conditions | {"load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    return result.build(records, gaps, weights, slo, "bench", conditions)


def profile(stack: Stack, out: Path, repeats: int) -> None:
    cmd = [sys.executable, "-m", "pdserve.cli", "profile", "--out", str(out), "--cpus", "1",
           "--threads", "1", "--repeats", str(repeats), "--url", stack.grpc_address,
           "--quantization", QUANTIZATION]  # fmt: skip
    subprocess.run(cmd, check=True)


def simulate(workload, mode: str, profile_path: Path, slo: result.Slo) -> dict:
    num_prefill = MODES[mode][0]
    sim = Simulator(workload, SimConfig(num_prefill, 1, slo), load_profile(profile_path))
    sim.run()
    return sim.result()


def compare(live_res: dict, sim_res: dict) -> dict:
    out = {}
    for metric, q in COMPARED:
        a, b = live_res[metric][q], sim_res[metric][q]
        out[f"{metric[:-2]}_{q}"] = {"live": a, "sim": b, "error": (b - a) / a if a else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--num-requests", type=int, default=40)
    ap.add_argument("--rates", default="0.3,1.0", help="two loads, requests/s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="profile repeats")
    ap.add_argument("--modes", default="disaggregated,colocated")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/sim_validation"))
    ap.add_argument("--profile", type=Path, help="reuse this profile instead of measuring")
    ap.add_argument(
        "--sim-only",
        action="store_true",
        help="re-simulate the saved live runs in --out (after a simulator change)",
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    slo = result.Slo()
    rates = [float(r) for r in args.rates.split(",")]
    profile_path = args.profile or args.out / "profile.json"
    if args.sim_only:
        report(resimulate(args, rates, slo, profile_path), args, profile_path)
        return
    rows = []
    for mode in args.modes.split(","):
        with Stack(stack_config(mode, f"simval-{mode}")) as stack:
            if mode == "disaggregated" and args.profile is None:
                profile(stack, profile_path, args.repeats)
            for rate in rates:
                workload = make_workload(args.num_requests, rate, args.seed)
                save(args.out / f"workload-{rate}.jsonl", workload)
                print(f"{mode} at {rate} req/s: live ...", flush=True)
                started = time.time()
                prompt_seed = args.seed * 100_000 + round(rate * 1000)
                live_res = live(stack, workload, slo, {"mode": mode, "rate": rate,
                                                       "prompt_seed": prompt_seed}, prompt_seed)  # fmt: skip
                sim_res = simulate(workload, mode, profile_path, slo)
                result.write(args.out / f"bench-{mode}-{rate}.json", live_res)
                result.write(args.out / f"sim-{mode}-{rate}.json", sim_res)
                row = {"mode": mode, "rate": rate, "wall_s": round(time.time() - started, 1),
                       "load_avg_1m": live_res["conditions"]["load_avg_1m"],
                       **compare(live_res, sim_res)}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    report(rows, args, profile_path)


def resimulate(args, rates: list[float], slo: result.Slo, profile_path: Path) -> list[dict]:
    from pdserve.workload.format import load

    rows = []
    for mode in args.modes.split(","):
        for rate in rates:
            live_res = json.loads((args.out / f"bench-{mode}-{rate}.json").read_text())
            workload = load(args.out / f"workload-{rate}.jsonl")
            sim_res = simulate(workload, mode, profile_path, slo)
            result.write(args.out / f"sim-{mode}-{rate}.json", sim_res)
            rows.append({"mode": mode, "rate": rate, "wall_s": None,
                         "load_avg_1m": live_res["conditions"]["load_avg_1m"],
                         **compare(live_res, sim_res)})  # fmt: skip
    return rows


def report(rows: list[dict], args, profile_path: Path) -> None:
    machine = json.loads(profile_path.read_text())["machine"]
    lines = ["| stack | rate req/s | load avg 1m (before, after) | TTFT p50 live / sim (err) | "
             "TTFT p90 live / sim (err) | ITL p50 live / sim (err) |", "|---|---|---|---|---|---|"]  # fmt: skip
    ok = True
    for r in rows:
        cells = []
        for key in ("ttft_p50", "ttft_p90", "itl_p50"):
            c = r[key]
            ok &= c["error"] is not None and abs(c["error"]) <= TOLERANCE
            cells.append(f"{c['live'] * 1000:.0f} / {c['sim'] * 1000:.0f} ms ({c['error']:+.0%})")
        lines.append(
            f"| {r['mode']} | {r['rate']} | {r['load_avg_1m']} | " + " | ".join(cells) + " |"
        )
    table = "\n".join(lines)
    head = (f"sim validation [{args.num_requests} requests per run, seed {args.seed}, "
            f"{machine['cpu']} x{machine['cpus']} (profile), target +-{TOLERANCE:.0%}]: "
            f"{'all within' if ok else 'NOT all within'} target")  # fmt: skip
    print(head)
    print(table)
    (args.out / "results.json").write_text(json.dumps({"headline": head, "rows": rows,
                                                       "machine": machine}, indent=1) + "\n")  # fmt: skip
    (args.out / "TABLE.md").write_text(head + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
