"""benchmarks/peer_pdserve.py: the quality pass measures the quantized kernels themselves."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import peer_pdserve  # noqa: E402

from pdserve.model import quant  # noqa: E402
from pdserve.model.loader import load_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def int4_engine():
    return peer_pdserve.engine_for(load_checkpoint(None), "int4", threads=1)


def test_quality_decodes_in_batches_the_quantized_kernel_runs(int4_engine, monkeypatch):
    """Six prompts generated at once decoded six rows a step, which runs the dense bf16 copy:
    the table then scored that copy and called it int4."""
    rows_seen: list[int] = []
    call = quant.Int4Linear.__call__

    def recording(self, x):
        rows_seen.append(x.shape[0])
        return call(self, x)

    monkeypatch.setattr(quant.Int4Linear, "__call__", recording)
    prompts = [[100 + i, 200 + i, 300 + i, 400 + i, 500 + i, 600 + i, 700 + i, 800 + i]
               for i in range(6)]  # fmt: skip
    spec = {"quality_new_tokens": 3, "quality_prompts": prompts, "quality_text": list(range(40))}
    result = peer_pdserve.quality(int4_engine, spec)
    assert [len(g) for g in result["greedy"]] == [3] * 6
    assert [len(g) for g in result["greedy_batched"]] == [3] * 6
    decode_rows = [n for n in rows_seen if n < 8]  # prompts are 8 tokens: the rest decode
    # the first pass stays within the few-row kernel; the second decodes all six together
    few_row_pass = decode_rows[: decode_rows.index(6)]
    assert few_row_pass and max(few_row_pass) <= quant.MAX_QUANTIZED_ROWS
    assert result["batched_rows"] == peer_pdserve.BATCHED_QUALITY_ROWS
