"""``pdserve profile``: measure this machine's engine and write the calibrated cost profile.

Engine: batches of known shape (single prompts of several lengths, some chunked over a long
context; decode batches of several sizes and contexts) run through the real ``LLMEngine``;
every step's wall time is recorded with its shape (tokens, sequences, attended query-key
pairs, KV context read, taken from each sequence's progress across the step) and a
non-negative least-squares fit gives the step-time coefficients of
:class:`pdserve.sim.costs.CalibratedCost`.

Stack (optional, ``url``): against a running disaggregated stack (one prefill, one decode
worker), idle, sequential requests measure the dispatch latency (short prompts the router
prefills locally: TTFT minus the fitted step time), the worker loop's overhead per step (an
idle stream's inter-token gap minus the fitted decode step) and the handoff (long prompts it sends to
the prefill worker: what TTFT leaves after dispatch, the prefill steps and decode's first
step, fitted to the simulator's pipelined handoff formula over a grid of bandwidths).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from pdserve.sim.costs import FEATURES, StepShape

# (prompt tokens, output tokens, batch size): prompts alone, chunked long prompts, decode batches.
ENGINE_CASES = (
    [(n, 1, 1) for n in (16, 64, 128, 256, 384, 512)]
    + [(1536, 1, 1)]
    + [(64, 24, b) for b in (1, 4, 16, 32)]
    + [(448, 24, b) for b in (4, 12)]
)
# ``pdserve profile --quick``: one of each kind (a prompt alone, a chunked one, decode batches).
QUICK_ENGINE_CASES = [(32, 1, 1), (192, 1, 1), (640, 1, 1), (48, 8, 1), (48, 8, 4), (192, 8, 8)]


def measure_engine(
    threads: int,
    kv_cache_bytes: int,
    repeats: int,
    log: Callable[[str], None],
    cases: list[tuple[int, int, int]] = ENGINE_CASES,
    quantization: str | None = None,
) -> tuple[list[list[float]], dict]:
    """(rows of FEATURES + seconds, the engine section of the profile). ``quantization``:
    the workers' weight mode when it is not the engine's default."""
    import torch

    from pdserve.engine.engine_config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine, requested_dtype
    from pdserve.engine.sampling_params import SamplingParams

    torch.set_num_threads(threads)
    chosen = {"quantization": quantization} if quantization else {}
    config = EngineConfig(kv_cache_bytes=kv_cache_bytes, num_threads=threads, **chosen)
    engine = LLMEngine(config)
    engine.generate([[5] * 32], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    rows: list[list[float]] = []
    rng = np.random.default_rng(0)
    for prompt_tokens, output_tokens, batch in cases * repeats:
        params = SamplingParams(max_tokens=output_tokens, ignore_eos=True, temperature=0.0)
        for _ in range(batch):
            engine.add_request(rng.integers(100, 40000, prompt_tokens).tolist(), params)
        while engine.has_unfinished:
            rows.append(_timed_step(engine))
        log(f"  {batch} x {prompt_tokens}-token prompts, {output_tokens} tokens: "
            f"{len(rows)} steps so far")  # fmt: skip
    bm = engine.block_manager
    m = engine.model_config
    dtype = requested_dtype(config)  # what `auto` stands for on this device
    engine_section = {
        "num_kv_blocks": bm.num_blocks, "block_size": bm.block_size,
        "max_num_seqs": EngineConfig.max_num_seqs,
        "max_num_batched_tokens": EngineConfig.max_num_batched_tokens,
        "num_layers": m.num_layers,
        "kv_bytes_per_token": 2 * m.num_layers * m.num_kv_heads * m.head_dim * dtype.itemsize,
        "threads": threads, "dtype": str(dtype).removeprefix("torch."), **chosen,
    }  # fmt: skip
    return rows, engine_section


def _timed_step(engine) -> list[float]:
    sched = engine.scheduler
    seqs = list(sched.running) + list(sched.waiting)
    before = {id(s): s.num_computed_tokens for s in seqs}
    started = time.perf_counter()
    engine.step()
    elapsed = time.perf_counter() - started
    tokens = num_seqs = pairs = context = 0
    for s in seqs:
        start = before[id(s)]
        n = s.num_computed_tokens - start
        if n <= 0:  # not scheduled (or preempted: its progress was reset)
            continue
        tokens, num_seqs = tokens + n, num_seqs + 1
        pairs += n * (start + (n + 1) / 2)
        context += start + n
    return [1.0, tokens, num_seqs, pairs, context, elapsed]


def fit(rows: list[list[float]]) -> tuple[list[float], float]:
    """Non-negative least squares on relative error (short steps count as much as long
    ones); returns (coefficients in FEATURES order, median relative error)."""
    data = np.asarray(rows, dtype=float)
    x, y = data[:, : len(FEATURES)], data[:, -1]
    scale = 1.0 / y
    active = list(range(len(FEATURES)))
    while True:
        coef, *_ = np.linalg.lstsq(x[:, active] * scale[:, None], y * scale, rcond=None)
        if (coef >= 0).all():
            break
        del active[int(np.argmin(coef))]
    full = np.zeros(len(FEATURES))
    full[active] = coef
    error = float(np.median(np.abs(x @ full - y) / y))
    return full.tolist(), error


def _cost(coefficients: list[float], engine: dict):
    from pdserve.sim.costs import CalibratedCost, EngineLimits

    limits = EngineLimits(
        engine["num_kv_blocks"], engine["block_size"], engine["max_num_seqs"],
        engine["max_num_batched_tokens"],
    )  # fmt: skip
    return CalibratedCost("fit", tuple(coefficients), limits, None, 0.0, 1.0)


def measure_dispatch(
    url: str, coefficients: list[float], engine: dict, threshold_tokens: int, log
) -> dict:
    """Router + RPC time before a locally prefilled request's first step: idle TTFT of short
    prompts (below the router's threshold, so prefilled on the decode worker) minus the step."""
    cost = _cost(coefficients, engine)
    short = [n for n in (16, 48, 96) if n < threshold_tokens] or [min(16, threshold_tokens)]
    ttft = {n: _idle_ttft_s(url, n, repeats=3) for n in short}
    log(f"  idle TTFT, local prompts: { {n: round(t * 1000, 1) for n, t in ttft.items()} } ms")
    dispatch_s = max(0.0, statistics.median(ttft[n] - _prefill_s(cost, n) for n in short))
    return {"latency_s": dispatch_s, "idle_ttft_s": {str(n): t for n, t in ttft.items()}}


def measure_step_overhead(url: str, coefficients: list[float], engine: dict, log) -> float:
    """What a worker's loop adds to each engine step (streaming the token, its spans and
    load reports): the idle stream's median inter-token gap of a short prompt the router
    prefills locally, minus the fitted one-sequence decode step; never below 0."""
    from pdserve.client import Client

    cost = _cost(coefficients, engine)
    prompt_tokens, output_tokens = 32, 33
    gaps: list[float] = []
    with Client(url.removeprefix("grpc://"), timeout_s=120) as client:
        for r in range(3):
            prompt = [(500 + 11 * r + i) % 40000 + 100 for i in range(prompt_tokens)]
            last = None
            for chunk in client.stream(prompt, max_tokens=output_tokens, temperature=0.0,
                                       ignore_eos=True):  # fmt: skip
                now = time.perf_counter()
                if last is not None and chunk.token_ids:
                    gaps += [(now - last) / len(chunk.token_ids)] * len(chunk.token_ids)
                last = now
    context = prompt_tokens + output_tokens / 2
    step_s = float(cost.step_s(StepShape(1, 1, context, context)))
    gap_s = statistics.median(gaps)
    log(f"  idle inter-token gap {gap_s * 1000:.1f} ms, fitted decode step {step_s * 1000:.1f} ms")
    return max(0.0, gap_s - step_s)


def measure_handoff(
    url: str, coefficients: list[float], engine: dict, dispatch_s: float, log
) -> dict:
    """On a disaggregated stack: what idle TTFT of long prompts leaves after dispatch, the
    prefill steps and decode's first step, fitted to the pipelined handoff formula (latency,
    bandwidth) over a grid of bandwidths."""
    cost = _cost(coefficients, engine)
    long = [256, 512, 1024, 1536]
    ttft = {n: _idle_ttft_s(url, n, repeats=3) for n in long}
    log(f"  idle TTFT, handed-off prompts: { {n: round(t * 1000, 1) for n, t in ttft.items()} } ms")
    bs = engine["block_size"]
    extra = np.array([ttft[n] - dispatch_s - _prefill_s(cost, n)
                      - _prefill_s(cost, n % bs + 1, start=n - n % bs) for n in long])  # fmt: skip
    nbytes = np.array(long, dtype=float) * engine["kv_bytes_per_token"]
    prefill = np.array([_prefill_s(cost, n) for n in long])
    best = None
    for bw in np.geomspace(1e7, 1e11, 161):
        tail = np.maximum(nbytes / engine["num_layers"] / bw, nbytes / bw - prefill)
        latency = max(0.0, float(np.median(extra - tail)))
        err = float(np.sum((latency + tail - extra) ** 2))
        if best is None or err < best[0]:
            best = (err, bw, latency)
    _, bw, latency = best
    return {"latency_s": latency, "bytes_per_s": float(bw),
            "idle_ttft_s": {str(n): t for n, t in ttft.items()}}  # fmt: skip


def prefill_tokens_per_s(coefficients: list[float], engine: dict) -> float:
    """One idle replica's prompt throughput at a full token budget."""
    n = engine["max_num_batched_tokens"]
    return n / _prefill_s(_cost(coefficients, engine), n)


def _prefill_s(cost, num_tokens: int, start: int = 0) -> float:
    """Idle time to compute ``num_tokens`` prompt tokens after ``start`` cached ones, chunked."""
    budget, total, pos = cost.limits.max_num_batched_tokens, 0.0, start
    while pos < start + num_tokens:
        n = min(budget, start + num_tokens - pos)
        total += float(cost.step_s(StepShape(n, 1, n * (pos + (n + 1) / 2), pos + n)))
        pos += n
    return total


def _idle_ttft_s(url: str, num_tokens: int, repeats: int) -> float:
    from pdserve.client import Client

    values = []
    with Client(url.removeprefix("grpc://"), timeout_s=120) as client:
        for r in range(repeats):
            prompt = [(1000 + 7 * num_tokens + 13 * r + i) % 40000 + 100 for i in range(num_tokens)]
            sent = time.perf_counter()
            for _chunk in client.stream(prompt, max_tokens=1, temperature=0.0, ignore_eos=True):
                values.append(time.perf_counter() - sent)
                break
    return statistics.median(values)


def machine() -> dict:
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         model)  # fmt: skip
    except OSError:
        pass
    return {"cpu": model, "cpus": len(os.sched_getaffinity(0)), "load_avg_1m": os.getloadavg()[0]}
