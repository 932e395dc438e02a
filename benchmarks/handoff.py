"""Handoff overhead: the same long prompt prefilled on the decode worker (colocated) and on a
prefill worker on the same pinned core (disaggregated), side by side in one run.

    python benchmarks/handoff.py [--prompt-tokens 1024] [--reps 5] [--core 0] [--decode-core 1]
        [--layer-groups 4] [--step-tokens 512] [--threads]

One ``pdserve up`` stack (kvstore, one prefill, one decode, each engine on one thread and
``--step-tokens`` a step, both workers pinned to ``--core``, or the decode worker to
``--decode-core``); the script talks to the workers directly, so the router's
scheduling is not in the figure. Per repetition, in rotating order, a fresh prompt (nothing
cached anywhere) goes:

- colocated: Decode without a KV source (the decode worker prefills it, chunked);
- overlapped: Decode with ``prefill_address`` and the Prefill call together (the decode worker
  reserves its blocks and pulls each layer group of the blocks while the prompt computes;
  ``--layer-groups 0``: each step's blocks after its seal, the handoff before layer groups);
- sequential: Prefill, then Decode with the first token and the KV source (the old handoff).

TTFT = first DecodeChunk at the client. The headline is the median TTFT of each mode and the
overlapped/colocated ratio (target <= 1.05), printed with the load average: on a shared
machine only the ratio of the interleaved runs means anything.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import threading
import time

import grpc
from machine_info import cpu_model

from pdserve._proto.pdserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from pdserve.launcher import Stack, StackConfig

MODES = ("colocated", "overlapped", "sequential")


def _sampling(max_tokens: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _prompt(rep: int, mode: int, num_tokens: int) -> list[int]:
    base = [(i * 7919 + 13) % 20000 + 500 for i in range(num_tokens)]
    base[0], base[1] = 100 + rep, 200 + mode  # unique: nothing cached on either worker
    return base


def _ttft(stream, started: float) -> float:
    first = None
    for _ in stream:
        first = first or time.perf_counter() - started
    return first


def run_colocated(stubs, rid: str, prompt: list[int], max_tokens: int) -> float:
    request = decode_pb2.DecodeRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=_sampling(max_tokens)
    )
    started = time.perf_counter()
    return _ttft(stubs["decode"].Decode(request, timeout=600), started)


def run_overlapped(stubs, rid: str, prompt: list[int], max_tokens: int) -> float:
    sampling = _sampling(max_tokens)
    started = time.perf_counter()
    prefill = threading.Thread(
        target=stubs["prefill"].Prefill,
        args=(
            prefill_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling),
        ),
        kwargs={"timeout": 600},
    )
    prefill.start()
    request = decode_pb2.DecodeRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=sampling,
        prefill_address=stubs["prefill_address"],
    )  # fmt: skip
    ttft = _ttft(stubs["decode"].Decode(request, timeout=600), started)
    prefill.join()
    return ttft


def run_sequential(stubs, rid: str, prompt: list[int], max_tokens: int) -> float:
    sampling = _sampling(max_tokens)
    started = time.perf_counter()
    p = stubs["prefill"].Prefill(
        prefill_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling),
        timeout=600,
    )
    request = decode_pb2.DecodeRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=sampling,
        first_token_id=p.first_token_id, kv=p.kv,
    )  # fmt: skip
    return _ttft(stubs["decode"].Decode(request, timeout=600), started)


RUNNERS = {"colocated": run_colocated, "overlapped": run_overlapped, "sequential": run_sequential}
WORKERS = ("prefill", "decode")


def _thread_cpu_ns(pid: int) -> dict[int, int]:
    """CPU time of each thread of a process so far (/proc/<pid>/task/<tid>/schedstat)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        path = f"/proc/{pid}/task/{tid}/schedstat"
        with contextlib.suppress(OSError), open(path) as f:  # OSError: the thread ended
            out[int(tid)] = int(f.read().split()[0])
    return out


def _split_cpu_ms(before: dict[int, int], after: dict[int, int]) -> tuple[float, float]:
    """(the busiest thread, every other thread) in ms between two snapshots: the busiest is
    the engine thread of a worker that computed, the rest its gRPC, handoff and telemetry."""
    spent = sorted((ns - before.get(tid, 0) for tid, ns in after.items()), reverse=True)
    return spent[0] / 1e6, sum(spent[1:]) / 1e6


def _stubs(stack: Stack) -> dict:
    address = {c.role: f"127.0.0.1:{c.grpc_port}" for c in stack.children if c.grpc_port}
    return {
        "prefill": prefill_pb2_grpc.PrefillStub(grpc.insecure_channel(address["prefill"])),
        "decode": decode_pb2_grpc.DecodeStub(grpc.insecure_channel(address["decode"])),
        "prefill_address": address["prefill"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument(
        "--decode-core", type=int, default=None,
        help="pin the decode worker here instead (default: --core; colocated then runs there)",
    )  # fmt: skip
    ap.add_argument(
        "--quantization", default="auto", help="the workers' weights (auto: int4 on bf16 CPUs)"
    )
    ap.add_argument(
        "--step-tokens", type=int, default=512,
        help="both workers' max_num_batched_tokens: colocated and disaggregated compute the same "
        "chunks (pdserve up would cap a decode worker beside prefill workers at 64)",
    )  # fmt: skip
    ap.add_argument(
        "--layer-groups", type=int, default=4,
        help="the prefill's handoff_layer_groups (0: blocks move only after their step's seal)",
    )  # fmt: skip
    ap.add_argument(
        "--threads", action="store_true",
        help="also print each worker's CPU per request: its engine thread and all the others",
    )  # fmt: skip
    args = ap.parse_args()
    decode_core = args.core if args.decode_core is None else args.decode_core
    env = {
        "PDSERVE_PREFILL_HANDOFF_LAYER_GROUPS": str(args.layer_groups),
        "PDSERVE_PREFILL_NUM_THREADS": "1", "PDSERVE_DECODE_NUM_THREADS": "1",
        "PDSERVE_DECODE_KV_FETCH_TIMEOUT_S": "30",
        "PDSERVE_PREFILL_MAX_NUM_BATCHED_TOKENS": str(args.step_tokens),
        "PDSERVE_DECODE_MAX_NUM_BATCHED_TOKENS": str(args.step_tokens),
        "PDSERVE_PREFILL_QUANTIZATION": args.quantization,
        "PDSERVE_DECODE_QUANTIZATION": args.quantization,
    }  # fmt: skip
    config = StackConfig(
        num_prefill=1, num_decode=1, default_ports=False, env=env, cluster_name="handoffbench",
        cpu_affinity={"prefill": {args.core}, "decode": {decode_core}},
    )  # fmt: skip
    ttfts: dict[str, list[float]] = {m: [] for m in MODES}
    cpu_ms: dict[tuple[str, str], list[tuple[float, float]]] = {}  # (mode, worker) -> per rep
    loads = []
    with Stack(config) as stack:
        stubs = _stubs(stack)
        pids = {c.role: c.proc.pid for c in stack.children if c.role in WORKERS}
        RUNNERS["colocated"](stubs, "warm-c", _prompt(999, 0, 64), 2)  # warm-up
        RUNNERS["overlapped"](stubs, "warm-o", _prompt(999, 1, 64), 2)
        for rep in range(args.reps):
            order = MODES[rep % 3 :] + MODES[: rep % 3]  # rotate: no mode always goes first
            for mode in order:
                prompt = _prompt(rep, MODES.index(mode), args.prompt_tokens)
                before = {w: _thread_cpu_ns(pid) for w, pid in pids.items()}
                ttfts[mode].append(RUNNERS[mode](stubs, f"{mode}-{rep}", prompt, args.max_tokens))
                for w, pid in pids.items():
                    split = _split_cpu_ms(before[w], _thread_cpu_ns(pid))
                    cpu_ms.setdefault((mode, w), []).append(split)
                loads.append(os.getloadavg()[0])
    med = {m: statistics.median(v) for m, v in ttfts.items()}
    # Each repetition's modes ran back to back: their ratio cancels most of the machine's drift.
    paired = {
        m: statistics.median(a / c for a, c in zip(ttfts[m], ttfts["colocated"], strict=True))
        for m in ("overlapped", "sequential")
    }
    for mode in MODES:
        print(f"{mode:>10}: TTFT median {med[mode] * 1000:8.1f} ms  runs "
              + " ".join(f"{t * 1000:.0f}" for t in ttfts[mode]))  # fmt: skip
    if args.threads:  # the whole request, the decode steps after the first token included
        for mode in MODES:
            print(f"{mode:>10}: CPU per request (median ms), engine thread / other threads: "
                  + ", ".join(f"{w} {statistics.median(e for e, _ in cpu_ms[mode, w]):.0f} / "
                              f"{statistics.median(o for _, o in cpu_ms[mode, w]):.0f}"
                              for w in WORKERS))  # fmt: skip
    print(
        f"handoff: SmolLM2-135M (quantization {args.quantization}), {args.prompt_tokens}-token "
        f"prompt, {args.step_tokens}-token steps, layer groups {args.layer_groups}, prefill "
        f"pinned to core {args.core}, decode to core {decode_core} (1 thread each), "
        f"{args.reps} reps, {cpu_model()}; "
        f"overlapped/colocated TTFT {med['overlapped'] / med['colocated']:.3f}x (target <= 1.05), "
        f"sequential/colocated {med['sequential'] / med['colocated']:.3f}x; median of per-rep "
        f"ratios {paired['overlapped']:.3f}x / {paired['sequential']:.3f}x; "
        f"load avg 1-min {min(loads):.1f}-{max(loads):.1f}"
    )


if __name__ == "__main__":
    main()
