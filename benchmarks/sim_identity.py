"""Does a change to the simulator (or to the engine's Scheduler / BlockManager it runs) keep
every result? Simulates eleven setups with this checkout and with another one, and compares
their RESULT.json byte for byte. For speed work that must not change behaviour.

    git worktree add /tmp/sim-before <commit>
    .venv/bin/python benchmarks/sim_identity.py --against /tmp/sim-before [--num-requests 4000]

The setups: the speed benchmark's Azure-shaped workload on 2P+4D, 4 colocated and 1P+1D with
50 ms staleness (H100 Llama-3-8B roofline); shared system prompts on 2P+2D with the overlapped
handoff and on 2 colocated; a small KV pool (3,000 blocks) where sequences are preempted and
blocks evicted, disaggregated and colocated; a linear calibrated cost with short requests,
fast-forward on and off; prompts that are all shared prefix. Exit status 1 when any differs.
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def setups(num_requests: int) -> dict:
    from dataclasses import replace

    from pdserve.sim.cluster import SimConfig
    from pdserve.sim.costs import CalibratedCost, EngineLimits, Link
    from pdserve.sim.roofline import GPUS, MODELS, roofline
    from pdserve.workload.generate import Lengths, synthetic

    azure = synthetic(num_requests, 30.0, Lengths("azure"), Lengths("azure"), seed=0)
    h100 = roofline(GPUS["H100"], MODELS["llama-3-8b"])
    shared = synthetic(num_requests // 2, 20.0, Lengths("azure"), Lengths("azure"), seed=3,
                       shared_prefix_tokens=512, shared_share=0.6, num_prefix_groups=4)  # fmt: skip
    small = replace(h100, limits=EngineLimits(3000, 16, 64, 2048))
    linear = CalibratedCost("linear", (0.004, 2e-5, 1e-4, 1e-8, 2e-6), EngineLimits(400, 16, 8, 64),
                            Link(0.002, 1e6, 100.0, 2), dispatch_s=0.005,
                            prefill_tokens_per_s=1e4)  # fmt: skip
    short = synthetic(400, 20.0, seed=5, shared_prefix_tokens=32, shared_share=0.4,
                      prompt=Lengths("uniform:8:200"), output=Lengths("uniform:1:40"))  # fmt: skip
    whole = [replace(r, num_prefill_tokens=r.prefix_tokens) if r.prefix_group and i % 2 else r
             for i, r in enumerate(short)]  # fmt: skip
    return {
        "azure-2p4d": (azure, SimConfig(2, 4), h100),
        "azure-4-colocated": (azure, SimConfig(0, 4), h100),
        "azure-1p1d-stale-50ms": (azure, SimConfig(1, 1, staleness_s=0.05), h100),
        "shared-2p2d-overlap": (shared, SimConfig(2, 2, overlap_handoff=True), h100),
        "shared-2-colocated": (shared, SimConfig(0, 2), h100),
        "small-pool-1p2d-overlap": (shared, SimConfig(1, 2, overlap_handoff=True), small),
        "small-pool-2-colocated-threshold": (
            shared,
            SimConfig(0, 2, disaggregation_policy="threshold"),
            small,
        ),
        "linear-1p2d-threshold": (
            short,
            SimConfig(1, 2, disaggregation_policy="threshold"),
            linear,
        ),
        "linear-1p2d-step-by-step": (short, SimConfig(1, 2, fast_forward=False), linear),
        "whole-prefix-2-colocated": (whole, SimConfig(0, 2), linear),
        "whole-prefix-1p1d": (
            whole,
            SimConfig(1, 1, disaggregation_policy="threshold", threshold_tokens=16),
            linear,
        ),
    }


def write_results(out_dir: Path, num_requests: int) -> None:
    """Simulate every setup with the checkout this file is in; one RESULT.json each."""
    import json

    from pdserve.sim.cluster import simulate

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (workload, config, cost) in setups(num_requests).items():
        (out_dir / f"{name}.json").write_text(
            json.dumps(simulate(workload, config, cost), indent=1)
        )


def run_tree(root: Path, out_dir: Path, num_requests: int) -> None:
    """This script's ``--write`` mode on the checkout at ``root`` (its own pdserve first)."""
    code = (f"import sys; sys.path.insert(0, {str(root)!r}); "
            f"sys.path.insert(0, {str(HERE / 'benchmarks')!r}); import sim_identity; "
            f"sim_identity.write_results(__import__('pathlib').Path({str(out_dir)!r}), "
            f"{num_requests})")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--against", type=Path, required=True, help="the other checkout's root")
    ap.add_argument("--num-requests", type=int, default=4000)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        mine, theirs = Path(tmp, "this"), Path(tmp, "other")
        run_tree(HERE, mine, args.num_requests)
        run_tree(args.against.resolve(), theirs, args.num_requests)
        names = sorted(p.name for p in theirs.iterdir())
        differ = [n for n in names if not filecmp.cmp(mine / n, theirs / n, shallow=False)]
    for name in names:
        print(f"{'DIFFERS' if name in differ else 'same   '} {name}")
    print(f"{len(names) - len(differ)} of {len(names)} RESULT.json byte-identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
