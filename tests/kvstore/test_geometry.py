"""One source of truth for KV geometry: the kvstore learns its block size from the model the
workers serve (same variables as the prefill worker), so another model or dtype hands off."""

from __future__ import annotations

import json

import pytest

from pdserve.config import KVStoreSettings
from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.llm_engine import kv_block_nbytes
from pdserve.kv.blocks import model_block_nbytes


@pytest.fixture(scope="module")
def make_engine_block_bytes():
    import torch

    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.model.loader import load_checkpoint

    checkpoint = load_checkpoint(None, dtype=torch.float32)

    def make(config: EngineConfig) -> int:
        return LLMEngine(config, checkpoint=checkpoint).block_bytes

    return make


SMOLLM2_F32 = 30 * 2 * 16 * 3 * 64 * 4  # layers, K+V, tokens, kv heads, head dim, bytes


def test_default_model_geometry():
    exact = {"quantization": "none"}
    assert KVStoreSettings(**exact).block_size_bytes == SMOLLM2_F32 == 737_280
    assert KVStoreSettings(dtype="bfloat16", **exact).block_size_bytes == SMOLLM2_F32 // 2
    assert KVStoreSettings(block_size=32, **exact).block_size_bytes == SMOLLM2_F32 * 2
    # Whatever the engine resolves on this machine (quantized weights keep KV in bf16).
    assert KVStoreSettings().block_size_bytes == kv_block_nbytes(EngineConfig())


def test_the_store_and_the_engine_agree(make_engine_block_bytes):
    for config in (EngineConfig(), EngineConfig(quantization="none", block_size=8)):
        assert kv_block_nbytes(config) == make_engine_block_bytes(config)


def test_follows_the_prefill_workers_variables(monkeypatch):
    monkeypatch.setenv("PDSERVE_PREFILL_QUANTIZATION", "none")
    monkeypatch.setenv("PDSERVE_PREFILL_DTYPE", "bfloat16")
    monkeypatch.setenv("PDSERVE_PREFILL_BLOCK_SIZE", "8")
    assert KVStoreSettings().block_size_bytes == SMOLLM2_F32 // 4
    monkeypatch.setenv("PDSERVE_KVSTORE_BLOCK_SIZE_BYTES", "4096")
    assert KVStoreSettings(dram_capacity_bytes=1 << 20).block_size_bytes == 4096


def test_safetensors_checkpoint_geometry(tmp_path):
    config = {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    }  # fmt: skip  (Llama-3-8B)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_block_nbytes(tmp_path, "bfloat16", 16) == 32 * 2 * 16 * 8 * 128 * 2
    settings = KVStoreSettings(
        model=tmp_path, dtype="bfloat16", quantization="none", dram_capacity_bytes=1 << 26
    )
    assert settings.block_size_bytes == 2 << 20


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="dtype"):
        model_block_nbytes(None, "int3", 16)
