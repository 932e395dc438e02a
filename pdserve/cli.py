"""The `pdserve` command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="pdserve: disaggregated LLM serving"
)


@app.callback()
def _main() -> None:
    """pdserve: LLM serving with prefill/decode disaggregation."""


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="prompt text (a user message with --chat)")],
    chat: Annotated[
        bool, typer.Option("--chat", help="wrap PROMPT in the model's chat template")
    ] = False,
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 128,
    temperature: Annotated[float, typer.Option("--temperature")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="GGUF file or safetensors directory")
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto: bfloat16 on CUDA, float32 on the CPU")
    ] = "auto",
    quantization: Annotated[
        str,
        typer.Option(
            "--quantization", help="auto (int4 on a CPU with AVX2+FMA), none (exact), int8, int4"
        ),
    ] = "auto",
    attention_backend: Annotated[str, typer.Option("--attention-backend")] = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON object at the end")
    ] = False,
) -> None:
    """Generate text offline with the in-process engine, streaming to the terminal."""
    from pdserve.engine.engine_config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed
        )
        config = EngineConfig(
            model=model,
            dtype=dtype,
            quantization=quantization,
            attention_backend=attention_backend,
        )
        show_progress = not as_json and sys.stderr.isatty()
        engine = LLMEngine(config, progress=show_progress)
        request = (
            {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
        )
        text, token_ids, finish_reason = "", [], None
        for out in engine.stream(params=params, **request):
            text += out.text_delta
            token_ids.extend(out.new_token_ids)
            finish_reason = out.finish_reason
            if not as_json:
                sys.stdout.write(out.text_delta)
                sys.stdout.flush()
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(
            json.dumps({"text": text, "token_ids": token_ids, "finish_reason": finish_reason})
        )
    else:
        sys.stdout.write("\n")


@app.command()
def up(
    prefill: Annotated[
        int | None,
        typer.Option("--prefill", help="prefill workers; 0 = colocated mode [default: by cores]"),
    ] = None,
    decode: Annotated[
        int | None, typer.Option("--decode", help="decode workers [default: by cores]")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option("--redis-url", help="use this Redis instead of starting one")
    ] = None,
    http_port: Annotated[
        int, typer.Option("--http-port", help="router's OpenAI API (0: any free port)")
    ] = 8000,
    grpc_port: Annotated[
        int, typer.Option("--grpc-port", help="router's gRPC API (0: any free port)")
    ] = 50051,
    model: Annotated[
        Path | None, typer.Option("--model", help="GGUF file or safetensors directory")
    ] = None,
    cpu_affinity: Annotated[
        list[str] | None,
        typer.Option("--cpu-affinity", help="pin a role to CPUs, e.g. prefill=0-1 (repeatable)"),
    ] = None,
    cluster_name: Annotated[str, typer.Option("--cluster-name")] = "pdserve",
    log_dir: Annotated[
        Path | None, typer.Option("--log-dir", help="child logs (default: a temp dir)")
    ] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="send a demo chat request once ready")
    ] = False,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls", help="throw-away CA: mTLS between services, TLS on the router's APIs"
        ),
    ] = False,
) -> None:
    """Start Redis, a KV store, prefill and decode workers and the router; Ctrl-C stops all."""
    from pdserve.cpu_layout import choose_pools
    from pdserve.launcher import StackConfig, parse_cpu_affinity
    from pdserve.launcher import up as run_up

    pools = choose_pools(len(os.sched_getaffinity(0)), prefill, decode)
    typer.echo(f"pools: {pools.num_prefill} prefill, {pools.num_decode} decode ({pools.reason})")
    try:
        config = StackConfig(
            num_prefill=pools.num_prefill, num_decode=pools.num_decode, redis_url=redis_url, grpc_port=grpc_port,
            http_port=http_port, model=model, cpu_affinity=parse_cpu_affinity(cpu_affinity or []),
            cluster_name=cluster_name, log_dir=log_dir, tls=tls,
        )  # fmt: skip
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    raise typer.Exit(run_up(config, demo=demo))


@app.command()
def trace(
    request_id: Annotated[
        str | None, typer.Argument(help="request id (or trace id prefix); default: --last")
    ] = None,
    last: Annotated[bool, typer.Option("--last", help="the most recent request")] = False,
    trace_dir: Annotated[
        Path | None,
        typer.Option("--dir", help="span files directory", envvar="PDSERVE_TRACE_DIR"),
    ] = None,
) -> None:
    """Show one request's spans from the local span files as a waterfall."""
    from pdserve.span_file import DEFAULT_TRACE_DIR
    from pdserve.trace_view import TraceNotFound, show

    if request_id is not None and last:
        typer.echo("error: give a REQUEST_ID or --last, not both", err=True)
        raise typer.Exit(2)
    try:
        show(trace_dir or DEFAULT_TRACE_DIR, request_id)
    except TraceNotFound as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


from pdserve.sim.commands import register as _register_sim_commands  # noqa: E402

_register_sim_commands(app)


@app.command()
def certs(
    out_dir: Annotated[Path, typer.Argument(help="where ca.pem, <role>.pem, <role>-key.pem go")],
    cluster_name: Annotated[str, typer.Option("--cluster-name")] = "pdserve",
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="a name or IP the services are dialed by (repeatable)"),
    ] = None,
    valid_days: Annotated[int, typer.Option("--valid-days")] = 365,
) -> None:
    """Write a cluster CA and a certificate per service (router, prefill, decode, kvstore).

    The CA's key is not kept: issue a new set to add a host. For a test cluster or the compose
    stack; production issues certificates from its own CA (README: Security)."""
    from pdserve.tls import default_hosts, make_cluster_pki

    hosts = sorted(set(host or []) | set(default_hosts()))
    pki = make_cluster_pki(out_dir, cluster_name, hosts=hosts, valid_days=valid_days)
    typer.echo(f"wrote {pki.ca_file} and certificates for {', '.join(hosts)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
