"""Simulator speed: 100,000 Azure-shaped requests (prompt and output lengths resampled from the
packaged conversation trace, Poisson at 30 req/s) on a Llama-3-8B roofline cluster of
2 prefill + 4 decode H100 replicas. Target: under a minute. Prints the wall time, the CPU time
the run itself used (what it would take alone on a core) and the machine's CPU and 1-minute
load average (other processes on the same cores stretch the wall time).

    .venv/bin/python benchmarks/sim_speed.py [--num-requests 100000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pdserve.sim.cluster import SimConfig, Simulator  # noqa: E402
from pdserve.sim.profile import machine  # noqa: E402
from pdserve.sim.roofline import GPUS, MODELS, roofline  # noqa: E402
from pdserve.workload.generate import Lengths, synthetic  # noqa: E402
from pdserve.workload.result import headline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-requests", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=30.0)
    args = ap.parse_args()
    workload = synthetic(args.num_requests, args.rate, Lengths("azure"), Lengths("azure"), seed=0)
    cost = roofline(GPUS["H100"], MODELS["llama-3-8b"])
    load_before = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), time.process_time()
    sim = Simulator(workload, SimConfig(2, 4), cost)
    res = sim.run()
    wall_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    m = machine()
    verdict = ""
    if args.num_requests >= 100_000:
        verdict = " (meets the 60 s target)" if wall_s < 60 else " (misses the 60 s target)"
    print(
        f"sim speed: {args.num_requests} requests in {wall_s:.1f}s{verdict}, {cpu_s:.1f}s CPU "
        f"[{m['cpu']} x{m['cpus']}, load avg 1m {load_before:.2f} -> {os.getloadavg()[0]:.2f}; "
        f"2P+4D H100 Llama-3-8B roofline, Poisson {args.rate}/s, Azure lengths]"
    )
    print(headline(res))


if __name__ == "__main__":
    main()
