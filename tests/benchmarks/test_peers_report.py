"""benchmarks/peers.py's pure parts: the llama.cpp build each CPU gets, greedy agreement, and
the quality table's verdict on which pdserve precision may be the default."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import peers  # noqa: E402


def test_amx_cpu_gets_avx512_without_amx():
    flags = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"})
    described, args = peers.llamacpp_build(flags)
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AMX_TILE=OFF" in args
    assert "-DGGML_AVX512=ON" in args and "-DGGML_AVX512_BF16=ON" in args
    assert "-DGGML_AVX512_VBMI=ON" not in args  # not a flag of this CPU
    assert described.startswith("AVX-512 without AMX")


def test_cpu_without_amx_gets_the_native_build():
    assert peers.llamacpp_build(frozenset({"avx2", "fma"}))[1] == "-DGGML_NATIVE=ON"


def test_agreeing_prefix_stops_at_the_first_difference():
    assert peers.agreeing_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert peers.agreeing_prefix([1, 2], [1, 2]) == 2


def _quality(greedy, ppl, tokens=100):
    return {"greedy": greedy, "nll": math.log(ppl) * tokens, "nll_tokens": tokens}


def test_quality_table_names_the_precisions_no_worse_than_llamacpp():
    exact = [[1, 2, 3, 4], [5, 6, 7, 8]]
    results = {
        "pdserve": {
            "modes": {
                "none": {"quality": _quality(exact, 10.0)},
                "int8": {"quality": _quality([[1, 2, 3, 4], [5, 6, 7, 0]], 10.1)},
                "int4": {
                    "quality": {
                        **_quality([[1, 2, 0, 0], [5, 0, 0, 0]], 10.4),
                        "batched_rows": 16,
                        "greedy_batched": [[1, 2, 3, 4], [5, 6, 7, 0]],
                    }
                },
            }
        },
        "llamacpp": {"quality": _quality([[1, 2, 3, 0], [5, 6, 0, 0]], 10.3)},
    }
    text = peers.quality_table(results, {}, 4, 2)
    assert "| pdserve int8 | 3.5 | 1/2 | 87.5% | 10.100 |" in text
    assert "| llama.cpp Q4_1 | 2.5 | 0/2 | 62.5% | 10.300 |" in text
    assert "| pdserve int4, batches of 16 | 3.5 | 1/2 | 87.5% | 10.400 |" in text
    assert text.endswith("llama.cpp's: pdserve none, pdserve int8.")


def test_a_reused_llamacpp_result_reports_the_build_it_ran(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "LOGS", tmp_path)
    (tmp_path / "result-llamacpp.json").write_text('{"decode_step_s": 0.01, "build": "AVX-512"}')
    (tmp_path / "result-vllm.json").write_text('{"decode_step_s": 0.03}')
    assert peers.load_reused("llamacpp", "not built")[1] == "AVX-512"
    assert peers.load_reused("vllm", "not built") == ({"decode_step_s": 0.03}, "not built")
