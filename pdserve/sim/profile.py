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
# Live calibration (``--step-log``): seeded Poisson traffic through the stack at these loads
# (fractions of one worker's one-at-a-time service rate by the in-process fit), so that the
# workers run every kind of step they serve: prompts alone and chunked, decode batches, and
# prompt chunks next to running decodes. Its prompts and outputs span the shapes served.
CALIBRATION_PROMPT, CALIBRATION_OUTPUT = (16, 1024), (1, 48)
CALIBRATION_LOADS = (0.5, 1.0)
# Before it, decode batches of each size up to the largest over contexts of every length:
# this many requests at once, prompts spread over CALIBRATION_PROMPT's lower half (prefilled
# where the router sends them) and paired with outputs in a shuffled order (5 is prime to
# every burst size), outputs spread so that the batch shrinks one by one.
CALIBRATION_BURSTS = (3, 6, 9)
BURST_OUTPUT_TOKENS = (8, 64)
CALIBRATION_SEED = 7_000_000  # prompt ids and arrivals no benchmark workload uses
# The bursts' prompts take seconds to prefill on a CPU, so their early outputs end before the
# last prompt is in: they reach batches of 5-6, not 9. Then a ladder: this many short prompts
# at once (one prefill step on the worker the router keeps them on), outputs
# LADDER_OUTPUT_STEP apart, so that every batch size up to the ladder's decodes alone for more
# than MIN_RESIDUAL_STEPS steps and gets its own token residual (a batch of n rows is not
# linear in n on a CPU; the linear fit over-predicted batches of 6 by a third).
CALIBRATION_LADDER, LADDER_PROMPT_TOKENS, LADDER_OUTPUT_STEP = 16, 16, 7


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
    ones); returns (coefficients in FEATURES order, then any extra column's, median relative
    error). A row is its regressors, then seconds."""
    data = np.asarray(rows, dtype=float)
    x, y = data[:, :-1], data[:, -1]
    scale = 1.0 / y
    active = list(range(x.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(x[:, active] * scale[:, None], y * scale, rcond=None)
        if (coef >= 0).all():
            break
        del active[int(np.argmin(coef))]
    full = np.zeros(x.shape[1])
    full[active] = coef
    error = float(np.median(np.abs(x @ full - y) / y))
    return full.tolist(), error


def one_at_a_time_s(cost, prompt_tokens: float, output_tokens: float) -> float:
    """One request served alone: its prompt prefilled (chunked), then its output decoded."""
    budget, prefill_s, done = cost.limits.max_num_batched_tokens, 0.0, 0.0
    while done < prompt_tokens:
        n = min(budget, prompt_tokens - done)
        prefill_s += float(cost.step_s(StepShape(n, 1, n * (done + (n + 1) / 2), done + n)))
        done += n
    context = prompt_tokens + output_tokens / 2
    return prefill_s + output_tokens * float(cost.step_s(StepShape(1, 1, context, context)))


def calibration_traffic(url: str, coefficients: list[float], engine: dict, num_requests: int,
                        log) -> None:  # fmt: skip
    """Serve the calibration workloads (CALIBRATION_*) through the stack, one load after the
    other, and wait for each to finish."""
    import asyncio

    from pdserve.workload.bench import replay, target_for
    from pdserve.workload.format import Request
    from pdserve.workload.generate import Lengths, synthetic

    service_s = one_at_a_time_s(_cost(coefficients, engine), sum(CALIBRATION_PROMPT) / 2,
                                sum(CALIBRATION_OUTPUT) / 2)  # fmt: skip
    lengths = [
        Lengths("uniform:{}:{}".format(*r)) for r in (CALIBRATION_PROMPT, CALIBRATION_OUTPUT)
    ]

    async def serve(workload, seed: int):
        target = target_for(url, 600)
        try:
            return await replay(workload, target, seed=seed)
        finally:
            await target.close()

    for size in CALIBRATION_BURSTS:
        burst = [Request(0.0, _spread(CALIBRATION_PROMPT[0], sum(CALIBRATION_PROMPT) // 2,
                                      (i * 5) % size, size),
                         _spread(*BURST_OUTPUT_TOKENS, i, size)) for i in range(size)]  # fmt: skip
        asyncio.run(serve(burst, CALIBRATION_SEED - size))
        log(f"  calibration burst: {size} requests at once")
    ladder = [Request(0.0, LADDER_PROMPT_TOKENS, LADDER_OUTPUT_STEP * (i + 1))
              for i in range(CALIBRATION_LADDER)]  # fmt: skip
    asyncio.run(serve(ladder, CALIBRATION_SEED - 1))
    log(f"  calibration ladder: {CALIBRATION_LADDER} short prompts at once")
    for i, load in enumerate(CALIBRATION_LOADS):
        seed = CALIBRATION_SEED + i
        workload = synthetic(num_requests, load / service_s, *lengths, seed=seed)
        records, _, _ = asyncio.run(serve(workload, seed))
        failed = sum(1 for r in records if r.error)
        log(f"  calibration traffic at {load / service_s:.3f} req/s: {len(records)} requests"
            + (f", {failed} failed" if failed else ""))  # fmt: skip


def _spread(lo: int, hi: int, i: int, n: int) -> int:
    """The i-th of n values spread evenly from lo to hi."""
    return lo + (hi - lo) * i // max(1, n - 1)


def live_steps(paths: list[str], since_s: float) -> dict[str, list]:
    """The step records each worker's log holds from ``since_s`` on, by log file."""
    from pdserve.engine import step_log

    return {str(p): step_log.read(p, since_s) for p in paths}


# A step counts as alone on the machine below this share of overlap with another worker's
# steps, and as contended above 1 minus it.
OVERLAP_SHARE = 0.1


def fit_live(by_log: dict[str, list]) -> dict | None:
    """The step fit of the workers' logged steps (``step_fit`` of a live profile), from the
    steps that ran alone on the machine: the linear fit (with ``prompt_step_s``, what a step
    carrying prompt tokens pays on top, as the engine's own StepCosts has it) and the token
    residuals over the decode worker's steps (it runs every kind: decode batches, local
    prefills, prompt chunks next to decodes; all workers' steps without one); then, as
    medians of measured / fitted, the prefill worker's factor (its steps also write the KV
    to the kvstore) and the contention factor over the steps that ran while another worker
    computed throughout (each 1.0 with fewer than MIN_RESIDUAL_STEPS steps);
    ``max_fitted_tokens``: the largest step fitted (beyond it the fit extrapolates). None: too
    few steps."""
    from pdserve.engine import step_log

    alone, contended, overheads = [], [], []
    for path, records in by_log.items():
        others = sorted((r for p, recs in by_log.items() if p != path for r in recs),
                        key=lambda r: r.t)  # fmt: skip
        shares = step_log.overlaps(records, others)
        alone += [r for r, share in zip(records, shares, strict=True) if share < OVERLAP_SHARE]
        contended += [r for r, share in zip(records, shares, strict=True)
                      if share > 1 - OVERLAP_SHARE]  # fmt: skip
        overheads += step_log.loop_overheads_s(records)
    base = [r for r in alone if r.role == "decode"] or alone
    if len(base) < 2 * len(FEATURES):
        return None
    rows = [row[:-1] + [float(row[1] > row[2]), row[-1]] for row in live_rows(base)]
    *coefficients, prompt_step_s = fit(rows)[0]
    rows = [row[:-2] + row[-1:] for row in rows]
    cost = _cost(coefficients, _NO_ENGINE, prompt_step_s=prompt_step_s)
    residuals = token_residuals(rows, coefficients, cost)
    cost = _cost(coefficients, _NO_ENGINE, residuals, prompt_step_s)
    prefill = _median_ratio([r for r in alone if r.role == "prefill"], cost)
    factors = {"prefill": prefill or 1.0, "decode": 1.0, "": 1.0}
    contention = _median_ratio(contended, cost, factors)
    return {
        "source": "worker step logs", "features": list(FEATURES), "coefficients": coefficients,
        "prompt_step_s": prompt_step_s,
        "median_relative_error": _median_error(rows, cost), "num_steps": len(rows),
        "token_residuals_s": residuals, "prefill_worker_factor": prefill or 1.0,
        "contention_factor": contention or 1.0, "num_contended_steps": len(contended),
        "loop_overhead_s": statistics.median(overheads) if overheads else 0.0,
        "max_fitted_tokens": max(r.num_tokens for r in base),
        "samples": rows,
    }  # fmt: skip


def extrapolation_warning(fitted: dict, budget: int) -> str | None:
    """Why a live fit is unsafe when its (decode worker's) steps stop short of the token
    budget: a capped decode worker beside prefill workers never runs the large steps a
    colocated one does, and the prefill worker's factor, fitted on shapes the decode worker
    never ran, takes up the fit's error there instead of measuring the prefill worker."""
    if fitted["max_fitted_tokens"] >= budget // 2:
        return None
    return (f"the fitted steps reach {fitted['max_fitted_tokens']} of the {budget}-token "
            "budget; larger ones are extrapolated and the prefill worker's factor absorbs the "
            "difference: calibrate a stack whose decode worker runs the full budget "
            "(PDSERVE_DECODE_MAX_NUM_BATCHED_TOKENS)")  # fmt: skip


_NO_ENGINE = {"num_kv_blocks": 1, "block_size": 1, "max_num_seqs": 1, "max_num_batched_tokens": 1}


def _median_ratio(records, cost, factors: dict[str, float] | None = None) -> float | None:
    """Median of measured / modelled step time (times the role's factor); None with fewer
    than MIN_RESIDUAL_STEPS steps."""
    if len(records) < MIN_RESIDUAL_STEPS:
        return None
    return statistics.median(
        r.engine_s / float(cost.step_s(_shape(r))) / (factors or {}).get(r.role, 1.0)
        for r in records
    )


def _median_error(rows: list[list[float]], cost) -> float:
    return statistics.median(abs(float(cost.step_s(StepShape(*row[1:5]))) - row[-1]) / row[-1]
                             for row in rows)  # fmt: skip


def _shape(record) -> StepShape:
    r = record
    return StepShape(r.num_tokens, r.num_seqs, r.attended_pairs, r.context_tokens)


def live_rows(records) -> list[list[float]]:
    """Fit rows (FEATURES + seconds) of step records."""
    return [[1.0, r.num_tokens, r.num_seqs, r.attended_pairs, r.context_tokens, r.engine_s]
            for r in records]  # fmt: skip


# A token count needs this many measured steps before its residual is trusted.
MIN_RESIDUAL_STEPS = 5


def token_residuals(rows: list[list[float]], coefficients: list[float],
                    cost=None) -> dict[str, float]:  # fmt: skip
    """Per number of batched tokens with at least MIN_RESIDUAL_STEPS measured steps: the
    median of (measured - fitted) step time (fitted: ``cost``'s, or the linear
    ``coefficients``'). Decode batches of a few rows run matrix kernels whose time is not
    linear in the row count (on this CPU a batch of 4 can take longer than one of 5); the
    linear fit cannot follow that, the measured residual does."""
    by_tokens: dict[int, list[float]] = {}
    for row in rows:
        fitted = (float(cost.step_s(StepShape(*row[1:5]))) if cost is not None
                  else float(np.dot(coefficients, row[: len(FEATURES)])))  # fmt: skip
        by_tokens.setdefault(int(row[1]), []).append(row[-1] - fitted)
    return {str(n): statistics.median(r) for n, r in sorted(by_tokens.items())
            if len(r) >= MIN_RESIDUAL_STEPS}  # fmt: skip


def _fitted_cost(coefficients: list[float], engine: dict, step_fit: dict | None):
    fit = step_fit or {}
    return _cost(coefficients, engine, fit.get("token_residuals_s"), fit.get("prompt_step_s", 0.0))


def _cost(coefficients: list[float], engine: dict, residuals: dict[str, float] | None = None,
          prompt_step_s: float = 0.0):  # fmt: skip
    from pdserve.sim.costs import CalibratedCost, EngineLimits

    limits = EngineLimits(
        engine["num_kv_blocks"], engine["block_size"], engine["max_num_seqs"],
        engine["max_num_batched_tokens"],
    )  # fmt: skip
    table = tuple(sorted((int(k), v) for k, v in (residuals or {}).items()))
    return CalibratedCost("fit", tuple(coefficients), limits, None, 0.0, 1.0,
                          token_residuals_s=table, prompt_step_s=prompt_step_s)  # fmt: skip


def measure_dispatch(
    url: str,
    coefficients: list[float],
    engine: dict,
    threshold_tokens: int,
    log,
    step_fit: dict | None = None,
) -> dict:
    """Router + RPC time before a locally prefilled request's first step: idle TTFT of short
    prompts (below the router's threshold, so prefilled on the decode worker) minus the step
    (``step_fit``: a live profile's, for its residuals and prompt-step cost)."""
    cost = _fitted_cost(coefficients, engine, step_fit)
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
    url: str,
    coefficients: list[float],
    engine: dict,
    dispatch_s: float,
    log,
    step_fit: dict | None = None,
) -> dict:
    """On a disaggregated stack: what idle TTFT of long prompts leaves after dispatch, the
    prefill worker's steps and decode's first step, fitted to the pipelined handoff formula
    (latency, bandwidth) over a grid of bandwidths."""
    cost = _fitted_cost(coefficients, engine, step_fit)
    slower = (step_fit or {}).get("prefill_worker_factor", 1.0)
    long = [256, 512, 1024, 1536]
    ttft = {n: _idle_ttft_s(url, n, repeats=3) for n in long}
    log(f"  idle TTFT, handed-off prompts: { {n: round(t * 1000, 1) for n, t in ttft.items()} } ms")
    bs = engine["block_size"]
    extra = np.array([ttft[n] - dispatch_s - slower * _prefill_s(cost, n)
                      - _prefill_s(cost, n % bs + 1, start=n - n % bs) for n in long])  # fmt: skip
    nbytes = np.array(long, dtype=float) * engine["kv_bytes_per_token"]
    prefill = np.array([slower * _prefill_s(cost, n) for n in long])
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
