"""The ``pdserve`` subcommands ``workload``, ``bench``, ``profile``, ``sim`` and ``plan``
(registered on the CLI's app by :func:`register`). Errors a user can fix exit with status 2
and one ``error:`` line naming the file, line and field."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pdserve.workload import result as results
from pdserve.workload.format import Request, WorkloadError

WorkloadArg = Annotated[
    str,
    typer.Argument(
        metavar="WORKLOAD", help="workload file (.csv or .jsonl), or 'azure' for the packaged trace"
    ),
]
TimeScale = Annotated[float, typer.Option("--time-scale", help="multiply arrival times")]
LengthScale = Annotated[float, typer.Option("--length-scale", help="multiply token counts")]
Rate = Annotated[
    float | None, typer.Option("--rate", help="rescale arrivals to this mean rate (req/s)")
]
MaxRequests = Annotated[int | None, typer.Option("--max-requests", help="use the first N")]
MaxPrompt = Annotated[
    int | None, typer.Option("--max-prompt-tokens", help="cap prompt lengths (small machines)")
]
SloTtft = Annotated[float, typer.Option("--slo-ttft-s", help="TTFT target, seconds")]
SloTpot = Annotated[float, typer.Option("--slo-tpot-s", help="mean inter-token target, seconds")]


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


def _workload(spec, time_scale, length_scale, rate, max_requests, max_prompt) -> list[Request]:
    from pdserve.workload import generate
    from pdserve.workload.format import load

    requests = load(generate.trace_path() if spec == "azure" else spec)
    requests = generate.scale(requests, time_scale, length_scale, max_requests, max_prompt)
    return generate.at_rate(requests, rate) if rate else requests


def workload(
    out: Annotated[Path, typer.Argument(help="file to write (.csv or .jsonl)")],
    num_requests: Annotated[int, typer.Option("--num-requests")] = 1000,
    rate: Annotated[float, typer.Option("--rate", help="mean arrivals per second")] = 1.0,
    burstiness: Annotated[
        float, typer.Option("--burstiness", help="inter-arrival CV: 1 Poisson, > 1 bursty")
    ] = 1.0,
    prompt: Annotated[
        str,
        typer.Option(
            "--prompt", help="fixed:N | uniform:LO:HI | lognormal:MED:SIGMA[:MAX] | azure"
        ),
    ] = "lognormal:1020:0.9:4096",
    output: Annotated[str, typer.Option("--output", help="as --prompt")] = "lognormal:130:0.9:1024",
    shared_prefix_tokens: Annotated[int, typer.Option("--shared-prefix-tokens")] = 0,
    shared_share: Annotated[float, typer.Option("--shared-share")] = 0.0,
    prefix_groups: Annotated[int, typer.Option("--prefix-groups")] = 1,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Generate a seeded workload (Poisson or bursty arrivals, length distributions, shared
    system prompts)."""
    from pdserve.workload.format import save
    from pdserve.workload.generate import Lengths, synthetic

    try:
        requests = synthetic(num_requests, rate, Lengths(prompt), Lengths(output), burstiness,
                             shared_prefix_tokens, shared_share, prefix_groups, seed)  # fmt: skip
        save(out, requests)
    except ValueError as exc:
        raise _fail(exc) from exc
    typer.echo(f"wrote {len(requests)} requests to {out}")


def bench(
    workload_spec: WorkloadArg,
    url: Annotated[str, typer.Option("--url", help="router: host:port (gRPC) or http://host:port")],
    out: Annotated[Path, typer.Option("--out", help="RESULT.json")],
    slo_ttft_s: SloTtft = 2.0,
    slo_tpot_s: SloTpot = 0.2,
    time_scale: TimeScale = 1.0,
    length_scale: LengthScale = 1.0,
    rate: Rate = None,
    max_requests: MaxRequests = None,
    max_prompt_tokens: MaxPrompt = None,
    seed: Annotated[int, typer.Option("--seed", help="prompt token ids")] = 0,
    vocab_size: Annotated[int, typer.Option("--vocab-size")] = 49152,
    timeout_s: Annotated[float, typer.Option("--timeout-s", help="per request")] = 600.0,
) -> None:
    """Replay a workload against a running stack, open loop; Ctrl-C still writes the result."""
    import asyncio

    try:
        requests = _workload(workload_spec, time_scale, length_scale, rate, max_requests,
                             max_prompt_tokens)  # fmt: skip
    except (ValueError, WorkloadError) as exc:
        raise _fail(exc) from exc
    load_before = os.getloadavg()[0]
    records, gaps, weights, interrupted = asyncio.run(
        _bench(requests, url, seed, vocab_size, timeout_s)
    )
    conditions = {"url": url, "workload": workload_spec, "time_scale": time_scale,
                  "length_scale": length_scale, "rate": rate, "seed": seed,
                  "interrupted": interrupted, "load_avg_1m": [load_before, os.getloadavg()[0]]}  # fmt: skip
    res = results.build(records, gaps, weights, results.Slo(slo_ttft_s, slo_tpot_s), "bench",
                        conditions)  # fmt: skip
    results.write(out, res)
    typer.echo(("interrupted: " if interrupted else "") + results.headline(res))
    typer.echo(f"wrote {out}")
    if interrupted:
        raise typer.Exit(130)


async def _bench(requests, url, seed, vocab_size, timeout_s):
    import asyncio
    import signal

    from rich.progress import Progress

    from pdserve.workload.bench import replay, target_for

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    target = target_for(url, timeout_s)
    try:
        with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
            task = progress.add_task("requests", total=len(requests))
            records, gaps, weights = await replay(
                requests, target, seed=seed, vocab_size=vocab_size, stop=stop,
                on_done=lambda: progress.advance(task),
            )  # fmt: skip
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        await target.close()
    return records, gaps, weights, stop.is_set()


def profile(
    out: Annotated[Path, typer.Option("--out", help="PROFILE.json")],
    threads: Annotated[int, typer.Option("--threads", help="torch threads, as the workers")] = 1,
    cpus: Annotated[
        str | None, typer.Option("--cpus", help="pin the measurement to these CPUs, e.g. 1")
    ] = None,
    kv_cache_bytes: Annotated[int, typer.Option("--kv-cache-bytes")] = 1 << 30,
    repeats: Annotated[int, typer.Option("--repeats")] = 2,
    url: Annotated[
        str | None,
        typer.Option("--url", help="a running stack: calibrate dispatch (and the handoff: 1P+1D)"),
    ] = None,
    quantization: Annotated[
        str | None, typer.Option("--quantization", help="the workers' weight mode, if not default")
    ] = None,
    handoff: Annotated[
        bool,
        typer.Option(
            "--handoff/--no-handoff",
            help="with --url: also fit the KV handoff (the stack has a prefill worker)",
        ),
    ] = True,
    quick: Annotated[
        bool, typer.Option("--quick", help="a few engine shapes only (a rough, fast profile)")
    ] = False,
    step_logs: Annotated[
        list[str] | None,
        typer.Option(
            "--step-log",
            help="with --url: a worker's step log (its step_log_path; repeatable): calibrate "
            "the steps from what the serving workers measure under calibration traffic",
        ),
    ] = None,
    calibration_requests: Annotated[
        int, typer.Option("--calibration-requests", help="with --step-log: requests per load")
    ] = 24,
) -> None:
    """Measure this machine's engine step times (and, with --url, dispatch and KV handoff)."""
    from pdserve.sim import profile as prof
    from services.router.settings import RouterSettings

    if step_logs and not url:
        raise _fail(ValueError("--step-log needs --url (the stack whose workers write them)"))
    all_cpus = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    machine = prof.machine()
    typer.echo(f"profiling the engine on {machine} ...")
    cases = prof.QUICK_ENGINE_CASES if quick or step_logs else prof.ENGINE_CASES
    rows, engine = prof.measure_engine(
        threads, kv_cache_bytes, repeats, typer.echo, cases=cases, quantization=quantization
    )
    coefficients, error = prof.fit(rows)
    data = {"machine": machine, "engine": engine, "step_fit": {
        "features": list(prof.FEATURES), "coefficients": coefficients,
        "median_relative_error": error, "num_steps": len(rows),
        "prefill_tokens_per_s": prof.prefill_tokens_per_s(coefficients, engine),
    }, "samples": rows}  # fmt: skip
    typer.echo(f"step fit over {len(rows)} steps: median relative error {error:.1%}")
    os.sched_setaffinity(0, all_cpus)  # the stack's clients run where the benchmarks' do
    if step_logs:
        coefficients, live = _live_fit(prof, url, step_logs, coefficients, engine,
                                       calibration_requests)  # fmt: skip
        data["in_process_step_fit"], data["step_fit"] = data["step_fit"], live
        data["samples"] = live.pop("samples")
    if url:
        overhead_s = (data["step_fit"]["loop_overhead_s"] if step_logs
                      else prof.measure_step_overhead(url, coefficients, engine, typer.echo))  # fmt: skip
        # The worker's steps as the simulator charges them: the engine's plus its loop's.
        served = [coefficients[0] + overhead_s, *coefficients[1:]]
        threshold = RouterSettings.model_fields["disagg_threshold_tokens"].default
        dispatch = prof.measure_dispatch(url, served, engine, threshold, typer.echo,
                                         data["step_fit"])  # fmt: skip
        dispatch["step_overhead_s"] = overhead_s
        data.update(dispatch=dispatch)
        typer.echo(f"dispatch {dispatch['latency_s'] * 1000:.1f} ms, worker loop "
                   f"{overhead_s * 1000:.1f} ms a step")  # fmt: skip
    if url and handoff:
        h = prof.measure_handoff(url, served, engine, dispatch["latency_s"], typer.echo,
                                 data["step_fit"])  # fmt: skip
        data.update(handoff=h)
        typer.echo(f"handoff latency {h['latency_s'] * 1000:.1f} ms at "
                   f"{h['bytes_per_s'] / 1e9:.2f} GB/s")  # fmt: skip
    data["machine"]["load_avg_1m_after"] = os.getloadavg()[0]
    out.write_text(json.dumps(data, indent=1) + "\n")
    typer.echo(f"wrote {out}")


def _live_fit(prof, url, step_logs, coefficients, engine, num_requests):
    """Calibration traffic through the stack, then the step fit over the steps its workers
    logged (``step_fit`` of the profile) and their loop's time between steps."""
    import time

    since_s = time.time()
    prof.calibration_traffic(url, coefficients, engine, num_requests, typer.echo)
    by_log = prof.live_steps(step_logs, since_s)
    fitted = prof.fit_live(by_log)
    if fitted is None:
        num_steps = sum(len(r) for r in by_log.values())
        raise _fail(ValueError(f"the step logs {step_logs} hold {num_steps} steps since the "
                               "calibration started: is step_log_path set on the workers?"))  # fmt: skip
    typer.echo(f"live step fit over {fitted['num_steps']} worker steps alone on the machine: "
               f"median relative error {fitted['median_relative_error']:.1%}; "
               f"prefill worker {fitted['prefill_worker_factor']:.3f}x; "
               f"{fitted['contention_factor']:.3f}x while another worker computes "
               f"({fitted['num_contended_steps']} steps); loop overhead "
               f"{fitted['loop_overhead_s'] * 1000:.1f} ms a step")  # fmt: skip
    warning = prof.extrapolation_warning(fitted, engine["max_num_batched_tokens"])
    if warning:
        typer.echo(f"warning: {warning}")
    fitted["prefill_tokens_per_s"] = prof.prefill_tokens_per_s(fitted["coefficients"], engine)
    return fitted["coefficients"], fitted


def _cost_model(profile_path, gpu, model, tp, max_num_seqs, max_num_batched_tokens):
    from pdserve.sim.costs import load_profile
    from pdserve.sim.roofline import parse_gpu, parse_model, roofline

    if (profile_path is None) == (gpu is None):
        raise ValueError("give either --profile PROFILE.json or --gpu (with --model)")
    if profile_path is not None:
        return load_profile(profile_path)
    return roofline(parse_gpu(gpu), parse_model(model), tp, max_num_seqs, max_num_batched_tokens)


ProfileOpt = Annotated[
    Path | None, typer.Option("--profile", help="calibrated cost model (pdserve profile)")
]
GpuOpt = Annotated[
    str | None, typer.Option("--gpu", help="roofline: H100 | H200 | B200 | NAME:TFLOPS:...")
]
ModelOpt = Annotated[
    str, typer.Option("--model", help="smollm2-135m | llama-3-8b | llama-3-70b | NAME:LAYERS:...")
]
TpOpt = Annotated[int | None, typer.Option("--tp", help="GPUs per replica (default: fits)")]
SeqsOpt = Annotated[int, typer.Option("--max-num-seqs", help="roofline replicas' batch")]
TokensOpt = Annotated[int, typer.Option("--max-num-batched-tokens", help="roofline budget")]
StaleOpt = Annotated[float | None, typer.Option("--staleness-s", help="worker load report period")]
DecodeTokensOpt = Annotated[
    int | None,
    typer.Option(
        "--decode-max-num-batched-tokens",
        help="decode replicas' token budget (default: with --profile and prefill replicas, "
        "the cap pdserve up sets; else the replicas' budget)",
    ),
]


def sim(
    workload_spec: WorkloadArg,
    out: Annotated[Path, typer.Option("--out", help="RESULT.json")],
    prefill: Annotated[int, typer.Option("--prefill", help="prefill replicas; 0: colocated")] = 1,
    decode: Annotated[int, typer.Option("--decode", help="decode (or colocated) replicas")] = 1,
    profile_path: ProfileOpt = None,
    gpu: GpuOpt = None,
    model: ModelOpt = "llama-3-8b",
    tp: TpOpt = None,
    max_num_seqs: SeqsOpt = 256,
    max_num_batched_tokens: TokensOpt = 4096,
    decode_max_num_batched_tokens: DecodeTokensOpt = None,
    slo_ttft_s: SloTtft = 2.0,
    slo_tpot_s: SloTpot = 0.2,
    staleness_s: StaleOpt = None,
    time_scale: TimeScale = 1.0,
    length_scale: LengthScale = 1.0,
    rate: Rate = None,
    max_requests: MaxRequests = None,
    max_prompt_tokens: MaxPrompt = None,
    fast_forward: Annotated[
        bool, typer.Option("--fast-forward/--step-by-step", help="skip pure-decode stretches")
    ] = True,
    overlap_handoff: Annotated[
        bool,
        typer.Option(
            "--overlap-handoff/--sequential-handoff",
            help="the router's handoff: overlapped as pdserve up runs it, or sequential "
            "(the router's own default)",
        ),
    ] = True,
) -> None:
    """Simulate a cluster on a workload with the router's policy and the engine's scheduler."""
    import time

    from pdserve.sim.cluster import SimConfig, Simulator
    from services.decode.settings import stack_decode_budget

    try:
        requests = _workload(workload_spec, time_scale, length_scale, rate, max_requests,
                             max_prompt_tokens)  # fmt: skip
        cost = _cost_model(profile_path, gpu, model, tp, max_num_seqs, max_num_batched_tokens)
        extra = {"staleness_s": staleness_s} if staleness_s is not None else {}
        if decode_max_num_batched_tokens is None and profile_path is not None:
            decode_max_num_batched_tokens = stack_decode_budget(prefill)
        config = SimConfig(prefill, decode, results.Slo(slo_ttft_s, slo_tpot_s),
                           fast_forward=fast_forward, overlap_handoff=overlap_handoff,
                           decode_max_num_batched_tokens=decode_max_num_batched_tokens,
                           **extra)  # fmt: skip
        started = time.perf_counter()
        simulator = Simulator(requests, config, cost)
        simulator.run()
    except (ValueError, WorkloadError) as exc:
        raise _fail(exc) from exc
    wall_s = time.perf_counter() - started
    conditions = simulator.conditions() | {"workload": workload_spec, "time_scale": time_scale,
                                           "length_scale": length_scale, "rate": rate,
                                           "sim_wall_s": wall_s}  # fmt: skip
    res = simulator.result(conditions)
    results.write(out, res)
    typer.echo(results.headline(res))
    typer.echo(f"simulated {len(requests)} requests in {wall_s:.1f}s; wrote {out}")


def plan(
    workload_spec: WorkloadArg,
    gpus: Annotated[
        list[str] | None,
        typer.Option("--gpu", help="GPU types to consider, optionally priced: H100=2.40"),
    ] = None,
    model: ModelOpt = "llama-3-8b",
    slo_ttft_s: SloTtft = 2.0,
    slo_tpot_s: SloTpot = 0.1,
    attainment: Annotated[float, typer.Option("--attainment", help="SLO attainment goal")] = 0.9,
    max_replicas: Annotated[int, typer.Option("--max-replicas")] = 32,
    time_scale: TimeScale = 1.0,
    length_scale: LengthScale = 1.0,
    rate: Rate = None,
    max_requests: Annotated[int | None, typer.Option("--max-requests")] = 2000,
    out: Annotated[Path | None, typer.Option("--out", help="plan JSON")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG: goodput and cost")] = None,
    metrics: Annotated[
        list[str] | None,
        typer.Option(
            "--metrics", help="a live service's /metrics URL (repeatable): which pool to grow"
        ),
    ] = None,
) -> None:
    """The cheapest pools and GPU type meeting the SLO, colocated vs disaggregated; with
    --metrics, which pool of a live stack to grow."""
    from pdserve.sim.plan_report import advise_live, run_plan

    try:
        if metrics:
            advise_live(metrics, typer.echo)
            if workload_spec == "-":
                return
        requests = _workload(workload_spec, time_scale, length_scale, rate, max_requests, None)
        run_plan(requests, gpus or ["H100", "H200", "B200"], model,
                 results.Slo(slo_ttft_s, slo_tpot_s), attainment, max_replicas, out, plot,
                 typer.echo)  # fmt: skip
    except (ValueError, WorkloadError, OSError) as exc:
        raise _fail(exc) from exc


def register(app: typer.Typer) -> None:
    app.command()(workload)
    app.command()(bench)
    app.command()(profile)
    app.command()(sim)
    app.command()(plan)
