"""load_checkpoint: GGUF and safetensors sources, the cache, fingerprints, errors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tiny_gguf
from gguf import GGMLQuantizationType as T

from pdserve.model import gguf_reader, loader
from pdserve.model.gguf_reader import llama3_rope_factors
from pdserve.model.loader import Checkpoint, default_model_path, load_checkpoint
from pdserve.model.tokenizer import Tokenizer


def assert_weights_equal(weights: dict[str, torch.Tensor], expected: dict[str, np.ndarray]) -> None:
    assert sorted(weights) == sorted(expected)
    for name, values in expected.items():
        assert torch.equal(weights[name], torch.from_numpy(values)), name


# ---- GGUF -------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_weights_config_tokenizer(tmp_path: Path, tied: bool) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", tied=tied)
    checkpoint = load_checkpoint(tiny.path, cache_dir=tmp_path / "cache")
    assert isinstance(checkpoint, Checkpoint)
    assert_weights_equal(checkpoint.weights, tiny.expected)
    assert ("lm_head.weight" in checkpoint.weights) is (not tied)
    assert checkpoint.config.tie_word_embeddings is tied
    assert checkpoint.weights["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert checkpoint.weights["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert checkpoint.tokenizer.encode("hello") == [tiny.tokens.index("hello")]
    assert checkpoint.tokenizer.eos_token_ids == checkpoint.config.eos_token_ids == (0, 2)
    assert re.fullmatch(r"[0-9a-f]{32}", checkpoint.fingerprint)


def test_k_quants_and_f16_load(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(
        tmp_path / "k.gguf", hidden=256, ffn=256, matrix_type=T.Q4_K, embed_type=T.F16
    )
    checkpoint = load_checkpoint(tiny.path, cache_dir=tmp_path / "cache")
    assert_weights_equal(checkpoint.weights, tiny.expected)
    tiny6 = write_tiny_gguf(tmp_path / "k6.gguf", hidden=256, ffn=256, matrix_type=T.Q6_K)
    assert_weights_equal(
        load_checkpoint(tiny6.path, cache_dir=tmp_path / "cache").weights, tiny6.expected
    )


def test_second_load_comes_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    first = load_checkpoint(tiny.path, cache_dir=cache)
    [entry] = list(cache.iterdir())
    assert sorted(p.name for p in entry.iterdir()) == [
        "meta.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]

    def no_gguf_reads(*args, **kwargs):
        raise AssertionError("the GGUF was read although the cache holds it")

    monkeypatch.setattr(loader, "read_gguf", no_gguf_reads)
    second = load_checkpoint(tiny.path, cache_dir=cache, progress=True)
    assert second.fingerprint == first.fingerprint
    assert second.config == first.config and second.config.name == first.config.name
    assert_weights_equal(second.weights, tiny.expected)
    messages = [{"role": "user", "content": "hello the"}]
    assert second.tokenizer.apply_chat_template(messages) == first.tokenizer.apply_chat_template(
        messages
    )
    assert second.tokenizer.eos_token_ids == first.tokenizer.eos_token_ids


def test_changed_file_is_a_cache_miss(tmp_path: Path) -> None:
    path, cache = tmp_path / "tiny.gguf", tmp_path / "cache"
    first = load_checkpoint(write_tiny_gguf(path, seed=1).path, cache_dir=cache)
    rewritten = write_tiny_gguf(path, seed=2)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = load_checkpoint(path, cache_dir=cache)
    assert_weights_equal(second.weights, rewritten.expected)
    assert second.fingerprint != first.fingerprint
    assert len(list(cache.iterdir())) == 2


def test_dtype_and_fingerprint(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    f32 = load_checkpoint(tiny.path, cache_dir=tmp_path / "a")
    bf16 = load_checkpoint(tiny.path, dtype=torch.bfloat16, cache_dir=tmp_path / "a")
    assert all(w.dtype == torch.bfloat16 for w in bf16.weights.values())
    assert torch.equal(
        bf16.weights["model.norm.weight"], f32.weights["model.norm.weight"].to(torch.bfloat16)
    )
    assert bf16.fingerprint != f32.fingerprint
    # same model and dtype elsewhere (another path, another cache): same fingerprint
    copy = tmp_path / "elsewhere" / "copy.gguf"
    copy.parent.mkdir()
    copy.write_bytes(tiny.path.read_bytes())
    assert load_checkpoint(copy, cache_dir=tmp_path / "b").fingerprint == f32.fingerprint
    with pytest.raises(ValueError, match="dtype"):
        load_checkpoint(tiny.path, dtype=torch.int8, cache_dir=tmp_path / "a")


def test_rope_freqs_become_config_not_a_weight(tmp_path: Path) -> None:
    params = {
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 16.0,
        "original_max_position_embeddings": 8192,
    }
    tiny = write_tiny_gguf(
        tmp_path / "r.gguf", rope_freqs=llama3_rope_factors(10000.0, 16, **params)
    )
    checkpoint = load_checkpoint(tiny.path, cache_dir=tmp_path / "cache")
    assert checkpoint.config.rope_scaling == {"rope_type": "llama3", **params}
    assert "rope_freqs.weight" not in checkpoint.weights
    cached = load_checkpoint(tiny.path, cache_dir=tmp_path / "cache")
    assert cached.config.rope_scaling == checkpoint.config.rope_scaling


def test_unwritable_cache_still_loads(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    checkpoint = load_checkpoint(tiny.path, cache_dir=blocker / "cache")
    assert_weights_equal(checkpoint.weights, tiny.expected)


def test_corrupt_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    load_checkpoint(tiny.path, cache_dir=cache)
    [entry] = list(cache.iterdir())
    (entry / "model.safetensors").write_bytes(b"garbage")
    assert_weights_equal(load_checkpoint(tiny.path, cache_dir=cache).weights, tiny.expected)
    assert_weights_equal(load_checkpoint(tiny.path, cache_dir=cache).weights, tiny.expected)


def test_directory_with_one_gguf_and_errors(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert (
        load_checkpoint(tmp_path, cache_dir=tmp_path / "c").weights.keys() == tiny.expected.keys()
    )
    write_tiny_gguf(tmp_path / "second.gguf")
    with pytest.raises(ValueError, match="2 .gguf files"):
        load_checkpoint(tmp_path, cache_dir=tmp_path / "c")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_text("not a gguf")
    with pytest.raises(ValueError, match="neither a GGUF"):
        load_checkpoint(tmp_path / "text.gguf")


def test_non_llama_gguf_is_refused(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'qwen2'"):
        load_checkpoint(tmp_path / "q.gguf", cache_dir=tmp_path / "c")


# ---- the default model --------------------------------------------------------------------


def test_default_model_path(default_gguf: Path) -> None:
    assert default_model_path() == default_gguf
    assert default_gguf.suffix == ".gguf" and default_gguf.stat().st_size > 50_000_000


def test_default_model_config_and_cache(default_gguf: Path, shared_cache_dir: Path) -> None:
    first = load_checkpoint(cache_dir=shared_cache_dir)
    second = load_checkpoint(default_gguf, cache_dir=shared_cache_dir)
    c = first.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (
        49152,
        576,
        1536,
        30,
    )
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (9, 3, 64)
    assert (c.rope_theta, c.max_position_embeddings, c.rope_scaling) == (100000.0, 8192, None)
    assert c.tie_word_embeddings and "lm_head.weight" not in first.weights
    assert (c.bos_token_id, c.eos_token_ids) == (
        1,
        (2,),
    )  # 2 = <|im_end|>, as HF's generation config
    assert second.fingerprint == first.fingerprint
    assert len(first.weights) == 2 + 30 * 9
    for name, tensor in first.weights.items():
        assert torch.equal(tensor, second.weights[name]), name


# ---- safetensors directories ----------------------------------------------------------------


def save_tiny_hf_llama(
    directory: Path,
    tiny_gguf_path: Path,
    *,
    tied: bool,
    rope_scaling=None,
    max_shard_size: str | None = None,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=266,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=50000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=[0, 2],
        rope_scaling=rope_scaling,
    )
    model = LlamaForCausalLM(config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    Tokenizer.from_gguf(gguf_reader.read_gguf(tiny_gguf_path)).save(directory)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_safetensors_directory(tmp_path: Path, tiny_gguf, tied: bool) -> None:
    directory = tmp_path / "tiny-llama"
    model = save_tiny_hf_llama(directory, tiny_gguf.path, tied=tied)
    checkpoint = load_checkpoint(directory, cache_dir=tmp_path / "cache")
    state = model.state_dict()
    expected_names = {n for n in state if not (tied and n == "lm_head.weight")}
    assert set(checkpoint.weights) == expected_names
    for name in expected_names:
        assert torch.equal(checkpoint.weights[name], state[name]), name
    c = checkpoint.config
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        266,
        64,
        2,
        4,
        2,
        16,
    )
    assert (c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings) == (50000.0, 1e-6, tied)
    assert (c.bos_token_id, c.eos_token_ids, c.rope_scaling) == (1, (0, 2), None)
    assert checkpoint.tokenizer.encode("hello") == [tiny_gguf.tokens.index("hello")]
    again = load_checkpoint(directory, cache_dir=tmp_path / "cache")
    assert again.fingerprint == checkpoint.fingerprint
    half = load_checkpoint(directory, dtype=torch.float16, cache_dir=tmp_path / "cache")
    assert half.weights["model.norm.weight"].dtype == torch.float16
    assert half.fingerprint != checkpoint.fingerprint


def test_safetensors_sharded_with_llama3_rope(tmp_path: Path, tiny_gguf) -> None:
    directory = tmp_path / "sharded"
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    model = save_tiny_hf_llama(
        directory, tiny_gguf.path, tied=False, rope_scaling=dict(rope), max_shard_size="100KB"
    )
    assert (directory / "model.safetensors.index.json").is_file()
    checkpoint = load_checkpoint(directory, cache_dir=tmp_path / "cache")
    assert checkpoint.config.rope_scaling == rope
    for name, tensor in model.state_dict().items():
        assert torch.equal(checkpoint.weights[name], tensor), name


def test_safetensors_directory_errors(tmp_path: Path, tiny_gguf) -> None:
    directory = tmp_path / "broken"
    save_tiny_hf_llama(directory, tiny_gguf.path, tied=False)
    config = json.loads((directory / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    weights = load_file(directory / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        load_checkpoint(directory, cache_dir=tmp_path / "cache")
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        load_checkpoint(directory, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("projections", [True, False])
def test_the_progress_bar_total_is_the_tensors_it_advances_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, projections: bool
) -> None:
    from contextlib import contextmanager

    bars: list[tuple[int | None, list[str]]] = []

    @contextmanager
    def recording_bar(enabled, total, description):
        advanced: list[str] = []
        bars.append((total, advanced))
        yield advanced.append

    monkeypatch.setattr(loader, "_progress_bar", recording_bar)
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    loader.load_checkpoint(tiny.path, cache_dir=tmp_path / "cache", projections=projections)
    [(total, advanced)] = bars
    assert total == len(advanced) > 0
