"""Validation of ``pdserve sim`` against ``pdserve bench`` on this machine.

The same seeded workloads (Poisson arrivals, prompts uniform 32-640 tokens so that the router
sends some to the prefill worker and prefills others locally, outputs 16-48 tokens) run live
on a ``pdserve up`` stack (disaggregated: prefill pinned to CPU 0, decode to CPU 1; colocated:
one decode worker on CPU 1, the router, kvstore and Redis on CPU 0; one torch thread each) and
in the simulator with the calibrated profile measured on the same machine just before, on a
stack of the first mode's kind whose decode worker runs the engine's full token budget: the
step costs from the steps the stack's own workers log (``step_log_path``) while they serve
calibration traffic, dispatch and handoff through the idle stack. Each run's simulation starts
from what the live stack had learned when the run started (its workers' StepCosts, the
router's prefill rate). The simulator runs the stack's settings: the router's defaults plus
the overlapped handoff that ``pdserve up`` turns on, and its decode worker's step budget
(capped beside a prefill worker). Target: TTFT p50/p90 and ITL p50 within 15 %, at two loads, for both
stacks. Prints the table and writes it (with every result) to --out.

Loads: by default two fractions of what one worker serves one request at a time (--loads,
from the profile: a mean prompt's prefill plus its decode steps), so the rates follow the
machine; --rates gives them in requests/s instead.

    .venv/bin/python benchmarks/sim_validate.py            # the full run (about 20 minutes on 2 cores)
    .venv/bin/python benchmarks/sim_validate.py --quick    # 12 requests a run (about 7 minutes)

Run it on a quiet machine: another process on the same cores slows the live runs and not the
simulated ones. The 1-minute load average is recorded before and after every live run, and
the headline says when it was above --max-load.
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

from pdserve.engine import step_log  # noqa: E402
from pdserve.engine.engine_config import EngineConfig  # noqa: E402
from pdserve.engine.step_costs import StepCosts  # noqa: E402
from pdserve.launcher import Stack, StackConfig, parse_cpu_affinity  # noqa: E402
from pdserve.sim.cluster import SimConfig, Simulator  # noqa: E402
from pdserve.sim.costs import StepShape, load_profile  # noqa: E402
from pdserve.sim.profile import live_rows, one_at_a_time_s  # noqa: E402
from pdserve.workload import result  # noqa: E402
from pdserve.workload.bench import replay, target_for  # noqa: E402
from pdserve.workload.format import load, save  # noqa: E402
from pdserve.workload.generate import Lengths, synthetic  # noqa: E402
from services.decode.settings import DecodeSettings, stack_decode_budget  # noqa: E402
from services.router.settings import RouterSettings  # noqa: E402

# mode: (prefill workers, CPU pinning). Disaggregated first: its stack also calibrates the handoff.
MODES = {
    "disaggregated": (1, ["prefill=0", "decode=1"]),
    "colocated": (0, ["decode=1", "router=0", "kvstore=0", "redis=0"]),
}
COMPARED = (("ttft_s", "p50"), ("ttft_s", "p90"), ("itl_s", "p50"))
TOLERANCE = 0.15
PROMPT, OUTPUT = (32, 640), (16, 48)  # uniform token ranges
# Unquantized float32 weights on both sides: the figures compare the simulator with the engine
# it models, whatever the engine's default weight mode.
QUANTIZATION = "none"
# What `pdserve up` sets on top of the router's defaults (pdserve/launcher.py): the simulated
# router must run the same way.
STACK_ROUTER = {"overlap_handoff": True}


def make_workload(num_requests: int, rate: float, seed: int):
    return synthetic(num_requests, rate, Lengths(f"uniform:{PROMPT[0]}:{PROMPT[1]}"),
                     Lengths(f"uniform:{OUTPUT[0]}:{OUTPUT[1]}"), seed=seed)  # fmt: skip


def step_logs(out: Path, mode: str, name: str | None = None) -> dict[str, Path]:
    """Each worker's step log (its simulated replica's id: the log), written by the stack."""
    roles = ["prefill", "decode"] if MODES[mode][0] else ["decode"]
    return {f"{role}-0": out / "steps" / f"{name or mode}-{role}.jsonl" for role in roles}


def stack_config(mode: str, name: str, out: Path, calibration: bool = False) -> StackConfig:
    """The ``pdserve up`` stack of a mode; for the calibration, with the decode worker at the
    engine's full token budget (see ``calibrate``)."""
    num_prefill, affinity = MODES[mode]
    env = {"PDSERVE_PREFILL_NUM_THREADS": "1", "PDSERVE_DECODE_NUM_THREADS": "1",
           "PDSERVE_LOG_LEVEL": "warning",
           **{f"PDSERVE_{role}_QUANTIZATION": QUANTIZATION
              for role in ("PREFILL", "DECODE", "KVSTORE")}}  # fmt: skip
    if calibration:
        env["PDSERVE_DECODE_MAX_NUM_BATCHED_TOKENS"] = str(EngineConfig.max_num_batched_tokens)
    logs = step_logs(out, mode, "calibration" if calibration else None)
    (out / "steps").mkdir(parents=True, exist_ok=True)
    for worker_id, path in logs.items():
        path.unlink(missing_ok=True)
        env[f"PDSERVE_{worker_id.removesuffix('-0').upper()}_STEP_LOG_PATH"] = str(path)
    return StackConfig(num_prefill=num_prefill, num_decode=1, default_ports=False, env=env,
                       cpu_affinity=parse_cpu_affinity(affinity), cluster_name=name)  # fmt: skip


def live(stack: Stack, workload, slo: result.Slo, conditions: dict, prompt_seed: int,
         logs: dict[str, Path]) -> dict:  # fmt: skip
    """``prompt_seed`` differs per run: one stack serves both loads, and a prompt it has seen
    would be a prefix-cache hit the (cold) simulation does not have. ``conditions["learned"]``:
    what the stack had learned when the run started (the router's prefill rate, each worker's
    StepCosts), which the simulation starts from; ``conditions["steps"]``: the run's steps."""

    async def go():
        target = target_for(stack.grpc_address, 600)
        try:
            await replay(workload[:2], target, seed=-1)  # warm-up: other prompts, no cache hits
            # until the router's view of the workers is their state now (heartbeat, refresh)
            await asyncio.sleep(2 * _worker_default("heartbeat_interval_s")
                                + _router_default("registry_refresh_s"))  # fmt: skip
            learned["prefill_tokens_per_s"] = _router_prefill_rate(stack)
            learned["since_s"] = time.time()
            return await replay(workload, target, seed=prompt_seed)
        finally:
            await target.close()

    learned: dict = {}
    load_before = os.getloadavg()[0]
    records, gaps, weights = asyncio.run(go())
    ended_s = time.time()
    learned["step_costs"] = {}
    conditions = conditions | {"load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    conditions["steps"] = {}
    for worker_id, path in logs.items():
        steps = step_log.read(path)
        costs = step_log.learned_costs(steps, learned["since_s"])
        learned["step_costs"][worker_id] = None if costs is None else list(costs.state())
        conditions["steps"][worker_id] = _step_summary(
            [r for r in steps if learned["since_s"] <= r.t < ended_s])  # fmt: skip
    return result.build(records, gaps, weights, slo, "bench", conditions | {"learned": learned})


def _worker_default(name: str):
    return DecodeSettings.model_fields[name].default


def _router_default(name: str):
    return RouterSettings.model_fields[name].default


def _router_prefill_rate(stack: Stack) -> float:
    """The router's learned prefill rate (its /health reports it)."""
    import urllib.request

    with urllib.request.urlopen(stack.http_url + "/health", timeout=5) as reply:
        return float(json.loads(reply.read())["prefill_tokens_per_s"])


def _step_summary(records) -> dict:
    """A run's live steps: how many, their engine time, the loop's time between them."""
    rows = live_rows(records)
    overheads = step_log.loop_overheads_s(records)
    return {"num_steps": len(rows), "rows": rows,
            "loop_overhead_s": sorted(overheads)[len(overheads) // 2] if overheads else None}  # fmt: skip


def calibrate(mode: str, out: Path, profile_path: Path, repeats: int, quick: bool,
              calibration_requests: int) -> None:  # fmt: skip
    """Measure the profile on a stack of its own: the mode's, with the decode worker at the
    engine's full budget. The profile's step fit is the decode worker's steps; ``pdserve up``
    caps a decode worker beside a prefill worker at a few dozen tokens a step, and a fit of
    those alone extrapolates to the colocated worker's 512-token steps (by 20 % too fast on
    this machine), while the prefill worker's factor, then fitted on shapes the decode worker
    never ran, absorbs the difference instead of measuring that worker."""
    logs = step_logs(out, mode, "calibration")
    with Stack(stack_config(mode, f"simval-calibration-{mode}", out, calibration=True)) as stack:
        cmd = [sys.executable, "-m", "pdserve.cli", "profile", "--out", str(profile_path),
               "--cpus", "1", "--threads", "1", "--repeats", str(repeats),
               "--url", stack.grpc_address, "--quantization", QUANTIZATION,
               "--handoff" if MODES[mode][0] else "--no-handoff",
               "--calibration-requests", str(calibration_requests)]  # fmt: skip
        for path in logs.values():
            cmd += ["--step-log", str(path)]
        subprocess.run(cmd + (["--quick"] if quick else []), check=True)


def rates_for(loads: list[float], profile_path: Path) -> list[float]:
    """Requests/s at each fraction of one worker's one-at-a-time service rate: a mean prompt
    prefilled alone, then its mean output decoded alone (the profile's step fit)."""
    service_s = one_at_a_time_s(load_profile(profile_path), sum(PROMPT) / 2, sum(OUTPUT) / 2)
    return [round(x / service_s, 3) for x in loads]


def simulate(workload, mode: str, profile_path: Path, slo: result.Slo, learned: dict) -> dict:
    """The run simulated from the state the live stack had learned when it started."""
    num_prefill = MODES[mode][0]
    config = SimConfig(num_prefill, 1, slo, prefill_tokens_per_s=learned["prefill_tokens_per_s"],
                       decode_max_num_batched_tokens=stack_decode_budget(num_prefill),
                       **STACK_ROUTER)  # fmt: skip
    sim = Simulator(workload, config, load_profile(profile_path))
    sim.start_from({wid: StepCosts.from_state(tuple(state))
                    for wid, state in learned["step_costs"].items() if state is not None})  # fmt: skip
    sim.run()
    return sim.result()


def compare(live_res: dict, sim_res: dict) -> dict:
    out = {}
    for metric, q in COMPARED:
        a, b = live_res[metric][q], sim_res[metric][q]
        err = (b - a) / a if a and b is not None else None
        out[f"{metric[:-2]}_{q}"] = {"live": a, "sim": b, "error": err}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true",
                    help="12 requests a run and a quick one-repeat profile, in --out/quick")  # fmt: skip
    ap.add_argument("--num-requests", type=int, help="per run (default 40; --quick 12)")
    ap.add_argument("--loads", default="0.3,0.8",
                    help="two loads as fractions of one worker's one-at-a-time service rate")  # fmt: skip
    ap.add_argument("--rates", help="two loads in requests/s (instead of --loads)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, help="profile repeats (default 2; --quick 1)")
    ap.add_argument("--calibration-requests", type=int,
                    help="profile: live calibration requests per load (default 24; --quick 8)")  # fmt: skip
    ap.add_argument("--modes", default="disaggregated,colocated")
    ap.add_argument("--out", type=Path, help="default benchmarks/sim_validation[/quick]")
    ap.add_argument("--profile", type=Path, help="reuse this profile instead of measuring")
    ap.add_argument("--max-load", type=float, default=1.0,
                    help="the headline flags runs that started above this 1-minute load")  # fmt: skip
    ap.add_argument("--sim-only", action="store_true",
                    help="re-simulate the saved live runs in --out (after a simulator change)")  # fmt: skip
    args = ap.parse_args(argv)
    base = Path(__file__).resolve().parent / "sim_validation"
    args.out = args.out or (base / "quick" if args.quick else base)
    args.num_requests = args.num_requests or (12 if args.quick else 40)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.calibration_requests = args.calibration_requests or (8 if args.quick else 24)
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        ap.error(f"--modes: unknown {sorted(unknown)}; use {', '.join(MODES)}")
    args.modes = [m for m in MODES if m in args.modes.split(",")]  # disaggregated first
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    slo = result.Slo()
    profile_path = args.profile or args.out / "profile.json"
    if args.sim_only:
        rows = resimulate(args, slo, profile_path)
    else:
        rows = run_live(args, slo, profile_path)
    report(rows, args, profile_path)
    return rows


def run_live(args, slo: result.Slo, profile_path: Path) -> list[dict]:
    rows, rates = [], None
    for stale in ("bench-*.json", "sim-*.json", "workload-*.jsonl"):  # --sim-only reads them all
        for path in args.out.glob(stale):
            path.unlink()
    if args.profile is None:  # measured fresh, on the first mode's topology
        calibrate(args.modes[0], args.out, profile_path, args.repeats, args.quick,
                  args.calibration_requests)  # fmt: skip
    for mode in args.modes:
        logs = step_logs(args.out, mode)
        with Stack(stack_config(mode, f"simval-{mode}", args.out)) as stack:
            rates = rates or _rates(args, profile_path)
            for rate in rates:
                workload = make_workload(args.num_requests, rate, args.seed)
                save(args.out / f"workload-{rate}.jsonl", workload)
                print(f"{mode} at {rate} req/s: live ...", flush=True)
                started = time.time()
                prompt_seed = args.seed * 100_000 + round(rate * 1000)
                live_res = live(stack, workload, slo, {"mode": mode, "rate": rate,
                                                       "prompt_seed": prompt_seed}, prompt_seed,
                                logs)  # fmt: skip
                result.write(args.out / f"bench-{mode}-{rate}.json", live_res)
                row = _simulate_run(args, mode, rate, live_res, workload, slo, profile_path,
                                    round(time.time() - started, 1))  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def _simulate_run(args, mode, rate, live_res, workload, slo, profile_path, wall_s) -> dict:
    """Simulate a live run with the profile; write the result."""
    sim_res = simulate(workload, mode, profile_path, slo, live_res["conditions"]["learned"])
    result.write(args.out / f"sim-{mode}-{rate}.json", sim_res)
    return _row(mode, rate, live_res, sim_res, wall_s, profile_path)


def _rates(args, profile_path: Path) -> list[float]:
    if args.rates:
        return [float(r) for r in args.rates.split(",")]
    return rates_for([float(x) for x in args.loads.split(",")], profile_path)


def _row(mode: str, rate: float, live_res: dict, sim_res: dict, wall_s: float | None,
         profile_path: Path) -> dict:  # fmt: skip
    return {"mode": mode, "rate": rate, "num_requests": live_res["num_requests"],
            "wall_s": wall_s, "load_avg_1m": live_res["conditions"]["load_avg_1m"],
            "routes_differ": _routes_differ(live_res, sim_res),
            "steps": _steps_vs_profile(live_res["conditions"]["steps"], profile_path),
            **compare(live_res, sim_res)}  # fmt: skip


def _routes_differ(live_res: dict, sim_res: dict) -> int:
    """Requests routed differently (local vs disaggregated) live and simulated."""
    sim_routes = {r["index"]: r.get("route") for r in sim_res["requests"]}
    return sum(1 for r in live_res["requests"] if r.get("route") != sim_routes.get(r["index"]))


def _steps_vs_profile(steps: dict, profile_path: Path) -> dict:
    """Per worker, how the run's live engine steps compare with the profile's step fit
    (median of live / fitted; 1 when the calibration holds) and the loop's time per step
    (live, and the profile's)."""
    cost = load_profile(profile_path)
    out = {}
    for worker_id, summary in steps.items():
        ratios = sorted(row[-1] / (float(cost.step_s(StepShape(*row[1:5]))) - cost.worker_overhead_s)
                        for row in summary["rows"])  # fmt: skip
        out[worker_id] = {"num_steps": summary["num_steps"],
                          "live_over_fit_p50": round(ratios[len(ratios) // 2], 3) if ratios else None,
                          "loop_overhead_ms": None if summary["loop_overhead_s"] is None
                          else round(summary["loop_overhead_s"] * 1000, 2),
                          "profile_loop_overhead_ms": round(cost.worker_overhead_s * 1000, 2)}  # fmt: skip
    return out


def resimulate(args, slo: result.Slo, profile_path: Path) -> list[dict]:
    rows = []
    for mode in args.modes:
        for live_path in sorted(args.out.glob(f"bench-{mode}-*.json")):
            rate = float(live_path.stem.removeprefix(f"bench-{mode}-"))
            live_res = json.loads(live_path.read_text())
            workload = load(args.out / f"workload-{rate}.jsonl")
            rows.append(_simulate_run(args, mode, rate, live_res, workload, slo, profile_path,
                                      None))  # fmt: skip
    return rows


def report(rows: list[dict], args, profile_path: Path) -> None:
    machine = json.loads(profile_path.read_text())["machine"]
    table, within = _table(rows)
    noisy = any(r["load_avg_1m"][0] > args.max_load for r in rows)
    num_requests = max((r["num_requests"] for r in rows), default=0)
    head = (f"sim validation [{num_requests} requests per run, seed {args.seed}, "
            f"{machine['cpu']} (profile on {machine['cpus']} pinned CPU, load avg "
            f"{machine['load_avg_1m']:.2f}), target +-{TOLERANCE:.0%}]: {within} of "
            f"{3 * len(rows)} figures within target"
            + (f"; WARNING: a run started above load {args.max_load}, the live figures are "
               "not this machine's" if noisy else ""))  # fmt: skip
    print(head)
    print(table)
    (args.out / "results.json").write_text(json.dumps({"headline": head, "rows": rows,
                                                       "machine": machine}, indent=1) + "\n")  # fmt: skip
    (args.out / "TABLE.md").write_text(head + "\n\n" + table + "\n")


def _table(rows: list[dict]) -> tuple[str, int]:
    """The markdown table and how many figures are within TOLERANCE."""
    lines = ["| stack | rate req/s | load avg 1m (before, after) | routes differ | "
             "TTFT p50 live / sim (err) | TTFT p90 live / sim (err) | ITL p50 live / sim (err) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    within = 0
    for r in rows:
        cells = []
        for key in ("ttft_p50", "ttft_p90", "itl_p50"):
            c = r[key]
            within += c["error"] is not None and abs(c["error"]) <= TOLERANCE
            err = "n/a" if c["error"] is None else f"{c['error']:+.0%}"
            cells.append(f"{_ms(c['live'])} / {_ms(c['sim'])} ms ({err})")
        lines.append(f"| {r['mode']} | {r['rate']} | {r['load_avg_1m']} | "
                     f"{r['routes_differ']} of {r['num_requests']} | " + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines), within


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


if __name__ == "__main__":
    main()
