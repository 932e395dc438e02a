"""benchmarks/peer_pdserve.py: the quality pass measures the quantized kernels themselves."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import peer_pdserve  # noqa: E402

from pdserve.model import llama, quant  # noqa: E402
from pdserve.model.loader import load_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def int4_engine():
    return peer_pdserve.engine_for(load_checkpoint(None), "int4", threads=1)


def test_quality_decodes_in_batches_the_quantized_kernel_runs(int4_engine, monkeypatch):
    """Prompts generated all at once decode as many rows a step, past PyTorch's few-row
    kernel: the table then scored another kernel and called it int4. The first pass decodes
    at most MAX_QUANTIZED_ROWS rows a step, the second all the prompts together."""
    decode_rows: list[int] = []  # rows of each pure-decode step (the decode stack's too)
    forward = llama.LlamaModel.forward

    def recording(self, input_ids, positions, kv_pool, meta, on_layer_done=None):
        if not meta.prefills:
            decode_rows.append(input_ids.shape[0])
        return forward(self, input_ids, positions, kv_pool, meta, on_layer_done)

    monkeypatch.setattr(llama.LlamaModel, "forward", recording)
    num_prompts, prompt_len = quant.MAX_QUANTIZED_ROWS + 2, 24
    assert num_prompts < peer_pdserve.BATCHED_QUALITY_ROWS
    prompts = [[100 + i + j for j in range(prompt_len)] for i in range(num_prompts)]
    spec = {"quality_new_tokens": 3, "quality_prompts": prompts, "quality_text": list(range(40))}
    result = peer_pdserve.quality(int4_engine, spec)
    assert [len(g) for g in result["greedy"]] == [3] * num_prompts
    assert [len(g) for g in result["greedy_batched"]] == [3] * num_prompts
    first_pass = decode_rows[: decode_rows.index(num_prompts)]
    assert first_pass and max(first_pass) <= quant.MAX_QUANTIZED_ROWS
    assert result["batched_rows"] == peer_pdserve.BATCHED_QUALITY_ROWS
