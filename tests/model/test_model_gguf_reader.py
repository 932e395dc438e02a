"""GGUF reading, dequantization (bit-exact against gguf.quants), and GGUF -> HF Llama mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import llama_cpp_permute, random_blocks, write_tiny_gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from pdserve.model.gguf_reader import (
    BLOCK_LAYOUT,
    dequantize,
    llama3_rope_factors,
    llama3_rope_scaling_from_factors,
    llama_config_from_gguf,
    read_gguf,
    unpermute_rope_rows,
)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K])
def test_dequantize_matches_gguf_reference_bit_for_bit(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    block_elements, _ = BLOCK_LAYOUT[qtype]
    rows, cols = 24, 2 * block_elements
    raw = random_blocks(qtype, rows * 2, rng).reshape(rows, -1)
    ours = dequantize(raw.reshape(-1), qtype, (rows, cols))
    reference = gguf_dequantize(raw, qtype)
    assert ours.dtype == np.float32 and ours.shape == (rows, cols)
    np.testing.assert_array_equal(ours.view(np.uint32), reference.view(np.uint32))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1])
def test_dequantize_quantized_values(qtype: T) -> None:
    values = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    blocks = gguf_quantize(values, qtype)
    ours = dequantize(blocks.reshape(-1), qtype, values.shape)
    np.testing.assert_array_equal(ours, gguf_dequantize(blocks, qtype))
    assert np.abs(ours - values).max() < 0.5  # and it is an approximation of the input


def test_dequantize_float_types() -> None:
    values = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    f32 = dequantize(values.view(np.uint8).reshape(-1), T.F32, values.shape)
    np.testing.assert_array_equal(f32, values)
    halves = values.astype(np.float16)
    f16 = dequantize(halves.view(np.uint8).reshape(-1), T.F16, values.shape)
    np.testing.assert_array_equal(f16, halves.astype(np.float32))
    bf16_bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    bf16 = dequantize(bf16_bits.view(np.uint8).reshape(-1), T.BF16, values.shape)
    np.testing.assert_array_equal(bf16, gguf_dequantize(bf16_bits.view(np.uint8), T.BF16))
    np.testing.assert_array_equal(bf16.view(np.uint32), bf16_bits.astype(np.uint32) << 16)


def test_unsupported_type_names_tensor_and_type() -> None:
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_q\.weight'.*Q5_0"):
        dequantize(np.zeros(22, np.uint8), T.Q5_0, (32,), "blk.0.attn_q.weight")


def test_unsupported_type_in_file_fails_before_loading(tmp_path: Path) -> None:
    from pdserve.model.gguf_reader import llama_weights_from_gguf

    tiny = write_tiny_gguf(tmp_path / "q5.gguf", matrix_type=T.Q5_1)
    gguf = read_gguf(tiny.path)
    with pytest.raises(ValueError, match=r"blk\.0\..*Q5_1"):
        llama_weights_from_gguf(gguf, llama_config_from_gguf(gguf))


def test_reader_agrees_with_gguf_reader(tiny_gguf) -> None:
    ours = read_gguf(tiny_gguf.path)
    reference = GGUFReader(tiny_gguf.path)
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for mine, theirs in zip(ours.tensors, reference.tensors, strict=True):
        assert mine.ggml_type == int(theirs.tensor_type)
        assert mine.shape == tuple(int(d) for d in reversed(theirs.shape))
        np.testing.assert_array_equal(ours.raw(mine), theirs.data.reshape(-1).view(np.uint8))
    for key, field in reference.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(ours.metadata[key], np.ndarray):
            np.testing.assert_array_equal(ours.metadata[key], value)
        else:
            assert ours.metadata[key] == value, key


def test_unpermute_inverts_llama_cpp_permutation_like_transformers() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = np.arange(12 * 16 * 5, dtype=np.float32).reshape(12 * 16, 5)
    for heads in (12, 4):
        permuted = llama_cpp_permute(weights, heads)
        np.testing.assert_array_equal(unpermute_rope_rows(permuted, heads), weights)
        hf = LlamaTensorProcessor()._reverse_permute_weights(permuted, heads, heads)
        np.testing.assert_array_equal(unpermute_rope_rows(permuted, heads), hf)


def test_config_from_gguf(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "t.gguf", tied=False, eot_token_id=2)
    config = llama_config_from_gguf(read_gguf(tiny.path))
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (
        len(tiny.tokens),
        64,
        128,
    )
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (
        2,
        4,
        2,
        16,
    )
    assert config.rope_theta == 10000.0 and config.max_position_embeddings == 256
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert config.tie_word_embeddings is False
    assert config.bos_token_id == 1
    # eos 0 from the file; eot 2 (<|im_end|>, which also closes turns in the template)
    assert config.eos_token_ids == (0, 2)
    assert config.rope_scaling is None
    assert config.name == "tiny-llama"


def test_template_end_of_turn_token_is_an_eos(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "t.gguf")  # eos <|endoftext|>, no eot key
    assert llama_config_from_gguf(read_gguf(tiny.path)).eos_token_ids == (0, 2)


def test_rope_scaling_linear_and_yarn(tmp_path: Path) -> None:
    linear = write_tiny_gguf(tmp_path / "l.gguf", rope_scaling={"type": "linear", "factor": 4.0})
    assert llama_config_from_gguf(read_gguf(linear.path)).rope_scaling == {
        "rope_type": "linear",
        "factor": 4.0,
    }
    yarn = write_tiny_gguf(
        tmp_path / "y.gguf",
        rope_scaling={"type": "yarn", "factor": 2.0, "original_context_length": 128},
    )
    assert llama_config_from_gguf(read_gguf(yarn.path)).rope_scaling == {
        "rope_type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 128,
    }


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path: Path) -> None:
    # What llama.cpp's converter writes for Llama 3.1 (theta 500000, head_dim 128), in float32.
    params = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    factors = llama3_rope_factors(500000.0, 128, **params).astype(np.float32)
    recovered = llama3_rope_scaling_from_factors(factors.astype(np.float64), 500000.0, 128, 8192)
    assert recovered == {"rope_type": "llama3", **params}
    # and end to end through a file: theta 10000 and head_dim 16 leave three frequencies in the
    # smoothed band for high_freq_factor 16 (llama.cpp writes no original length: 8192 assumed)
    params = {
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 16.0,
        "original_max_position_embeddings": 8192,
    }
    rope_freqs = llama3_rope_factors(10000.0, 16, **params)
    tiny = write_tiny_gguf(tmp_path / "r.gguf", rope_freqs=rope_freqs)
    gguf = read_gguf(tiny.path)
    assert llama_config_from_gguf(gguf).rope_scaling == {"rope_type": "llama3", **params}
    assert "rope_freqs.weight" in [t.name for t in gguf.tensors]


def test_rope_freqs_that_are_not_llama3_are_refused() -> None:
    with pytest.raises(ValueError, match="llama3"):
        llama3_rope_scaling_from_factors(np.linspace(1, 8, 64), 500000.0, 128, 8192)
