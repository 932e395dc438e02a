"""The DistServe-style experiment on the Azure conversation trace (2023, CC-BY 4.0) with
``pdserve plan``: Llama-3-8B- and 70B-shaped models on H100, H200 and B200 pools (roofline
costs), colocated vs disaggregated, the cheapest configuration meeting the SLO at the trace's
rate × ``--speedup``, its goodput per GPU and its cost per million output tokens.

    .venv/bin/python benchmarks/sim_at_scale.py [--max-requests 1000 --speedup 2]

Writes benchmarks/sim_at_scale/: plan-<model>.json, plan-<model>.png and TABLE.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pdserve.sim.plan_report import run_plan  # noqa: E402
from pdserve.sim.profile import machine  # noqa: E402
from pdserve.workload.generate import azure_conv, mean_rate_rps  # noqa: E402
from pdserve.workload.result import Slo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--max-requests", type=int, default=1000)
    ap.add_argument("--speedup", type=float, default=2.0, help="compress the trace's time")
    ap.add_argument(
        "--min-span-s",
        type=float,
        default=30.0,
        help="goodput search: the compressed sample must last this long",
    )
    ap.add_argument("--models", default="llama-3-8b,llama-3-70b")
    ap.add_argument("--gpus", default="H100,H200,B200")
    ap.add_argument("--slo-ttft-s", type=float, default=2.0)
    ap.add_argument("--slo-tpot-s", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/sim_at_scale"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    workload = azure_conv(time_scale=1 / args.speedup, max_requests=args.max_requests)
    slo = Slo(args.slo_ttft_s, args.slo_tpot_s)
    m = machine()
    sections = []
    for model in args.models.split(","):
        started = time.perf_counter()
        lines: list[str] = []
        run_plan(workload, args.gpus.split(","), model, slo, 0.9, 32,
                 args.out / f"plan-{model}.json", args.out / f"plan-{model}.png", lines.append,
                 args.min_span_s)  # fmt: skip
        table_start = next(i for i, ln in enumerate(lines) if ln.startswith("| GPU"))
        sections.append(f"### {model}\n\n" + "\n".join(lines[table_start:]) +
                        f"\n\n(planned in {time.perf_counter() - started:.0f}s)\n")  # fmt: skip
        print("\n".join(lines), flush=True)
    head = (f"Azure conversation trace, first {len(workload)} requests, time / {args.speedup:g} "
            f"({mean_rate_rps(workload):.1f} req/s); SLO TTFT <= {slo.ttft_s}s, TPOT <= "
            f"{slo.tpot_s}s for 90 % of requests; roofline costs; simulated on {m['cpu']} "
            f"x{m['cpus']} (load avg 1m {os.getloadavg()[0]:.1f})")  # fmt: skip
    (args.out / "TABLE.md").write_text(head + "\n\n" + "\n".join(sections))
    print(head)


if __name__ == "__main__":
    main()
