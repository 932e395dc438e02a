"""Reading a GGUF file: metadata, the tensor table, and numpy dequantization of the tensors.

A small reader of our own rather than `gguf.GGUFReader`: that one wraps every element of every
metadata array in its own numpy view, which costs ~3 s on SmolLM2's 49k-token vocabulary, more
than the whole rest of a first load. Tensor data is memory-mapped and read only when asked for.

Type ids and block layouts are the `gguf` package's tables. Dequantization gives bit-for-bit the
float32 values of `gguf.quants.dequantize` (which is what transformers' GGUF loader uses): the
same float32 operations in the same order, only done on whole tensors at once instead of
16-row groups, which is ~9x faster for Q8_0/Q4_0/Q4_1 (measured in one process on a busy
2-core Xeon: SmolLM2's Q8_0 embedding 0.70 s vs 6.2 s, a Q4_1 FFN tensor 0.023 s vs 0.23 s).
K-quants are delegated to `gguf.quants` itself.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from pdserve.model.config import ModelConfig
from pdserve.model.safetensors_dir import is_projection

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# ggml type ids and block layouts come from the gguf package's tables.
GGML_TYPE_NAMES = {t.value: t.name for t in GGMLQuantizationType}
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = (
    GGMLQuantizationType[name].value
    for name in ("F32", "F16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "BF16")
)
# ggml type -> (elements per block, bytes per block), for the types this module reads
BLOCK_LAYOUT = {
    t: GGML_QUANT_SIZES[GGMLQuantizationType(t)]
    for t in (F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K)
}
SUPPORTED_TYPES = tuple(GGML_TYPE_NAMES[t] for t in BLOCK_LAYOUT)

# metadata value type id -> struct format of one scalar
_SCALAR_FORMATS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
_LENGTH = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: [out, in] for a matrix (ggml lists dims the other way)
    ggml_type: int
    offset: int  # from the start of the data section

    @property
    def type_name(self) -> str:
        return GGML_TYPE_NAMES.get(self.ggml_type, f"type {self.ggml_type}")

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def num_bytes(self) -> int:
        block_elements, block_bytes = _layout(self)
        return self.num_elements // block_elements * block_bytes


@dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF: `metadata` maps keys to Python values (numeric arrays as numpy arrays,
    string arrays as lists of str); tensor data stays on disk until `raw(info)` is called."""

    path: Path
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_start: int
    _buffer: mmap.mmap

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapped file."""
        start = self.data_start + info.offset
        return np.frombuffer(self._buffer, dtype=np.uint8, count=info.num_bytes, offset=start)

    def dequantize(self, info: TensorInfo) -> np.ndarray:
        """The tensor as float32 (a fresh array, or for F32 a read-only view of the file)."""
        return dequantize(self.raw(info), info.ggml_type, info.shape, info.name)


def read_gguf(path: str | Path) -> GGUFFile:
    path = Path(path)
    with open(path, "rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if buffer[:4] != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (bad magic {bytes(buffer[:4])!r})")
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", buffer, 4)
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"{path}: GGUF version {version} is not supported (only 2 and 3)")
    reader = _Cursor(buffer, 24)
    metadata = {}
    for _ in range(kv_count):
        key = reader.string()
        metadata[key] = reader.value(reader.scalar("I"))
    tensors = []
    for _ in range(tensor_count):
        name = reader.string()
        num_dims = reader.scalar("I")
        dims = struct.unpack_from(f"<{num_dims}Q", buffer, reader.pos)
        reader.pos += 8 * num_dims
        ggml_type, offset = reader.scalar("I"), reader.scalar("Q")
        tensors.append(TensorInfo(name, tuple(int(d) for d in reversed(dims)), ggml_type, offset))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-reader.pos // alignment) * alignment
    return GGUFFile(path, metadata, tuple(tensors), data_start, buffer)


class _Cursor:
    """Sequential little-endian reads over the mapped header."""

    def __init__(self, buffer: mmap.mmap, pos: int) -> None:
        self.buffer, self.pos = buffer, pos

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("Q")
        value = self.buffer[self.pos : self.pos + length].decode("utf-8", errors="replace")
        self.pos += length
        return value

    def strings(self, count: int) -> list[str]:
        """A string array; its own loop because a vocabulary's 50k tokens and as many merges
        through `string()` were a tenth of a first load."""
        buffer, pos, read_length = self.buffer, self.pos, _LENGTH.unpack_from
        raw: list[bytes] = [b""] * count
        for i in range(count):
            (length,) = read_length(buffer, pos)
            pos += 8
            raw[i] = buffer[pos : pos + length]
            pos += length
        self.pos = pos
        return [value.decode("utf-8", errors="replace") for value in raw]

    def value(self, value_type: int) -> Any:
        if value_type in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type != _ARRAY:
            raise ValueError(f"unknown GGUF metadata value type {value_type}")
        element_type, count = self.scalar("I"), self.scalar("Q")
        if element_type == _STRING:
            return self.strings(count)
        if element_type == _ARRAY:
            return [self.value(_ARRAY) for _ in range(count)]
        fmt = _SCALAR_FORMATS[element_type]
        dtype = np.dtype("<" + fmt) if fmt != "?" else np.dtype(np.bool_)
        values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += count * dtype.itemsize
        return values


def _layout(info: TensorInfo) -> tuple[int, int]:
    layout = BLOCK_LAYOUT.get(info.ggml_type)
    if layout is None:
        raise ValueError(
            f"tensor {info.name!r} has GGML type {info.type_name}, which pdserve cannot dequantize "
            f"(supported: {', '.join(SUPPORTED_TYPES)})"
        )
    return layout


# ---- dequantization ------------------------------------------------------------------------

_Q4_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
_Q4_1_BLOCK = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
_Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", 32)])


def dequantize(
    raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], name: str = "?"
) -> np.ndarray:
    """Raw tensor bytes (uint8) -> float32 array of `shape` (torch order)."""
    info = TensorInfo(name, tuple(shape), ggml_type, 0)
    block_elements, block_bytes = _layout(info)
    if shape and shape[-1] % block_elements:
        raise ValueError(
            f"tensor {name!r}: row of {shape[-1]} is not a multiple of {block_elements}"
        )
    if raw.size != info.num_bytes:
        raise ValueError(f"tensor {name!r}: {raw.size} bytes, expected {info.num_bytes}")
    raw = raw.reshape(-1)
    if ggml_type == F32:
        out = raw.view("<f4")
    elif ggml_type == F16:
        out = raw.view("<f2").astype(np.float32)
    elif ggml_type == BF16:
        out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif ggml_type == Q8_0:
        out = _dequantize_q8_0(raw)
    elif ggml_type == Q4_0:
        out = _dequantize_q4_0(raw)
    elif ggml_type == Q4_1:
        out = _dequantize_q4_1(raw)
    else:  # K-quants: the reference numpy code is vectorised well enough
        from gguf.quants import dequantize as gguf_dequantize

        out = gguf_dequantize(raw.reshape(-1, block_bytes), ggml_type)
    return out.reshape(shape)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """[blocks, 16] packed bytes -> [blocks, 32] uint8: low nibbles are elements 0..15, high 16..31."""
    out = np.empty((qs.shape[0], 32), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=out[:, :16])
    np.right_shift(qs, 4, out=out[:, 16:])
    return out


def _dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    blocks = raw.view(_Q8_0_BLOCK)
    out = blocks["qs"].astype(np.float32)
    out *= blocks["d"].astype(np.float32)[:, None]  # x * d, as gguf.quants
    return out


def _dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    blocks = raw.view(_Q4_0_BLOCK)
    q = _unpack_nibbles(blocks["qs"]).view(np.int8)
    q -= 8
    out = q.astype(np.float32)
    out *= blocks["d"].astype(np.float32)[:, None]
    return out


def _dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    blocks = raw.view(_Q4_1_BLOCK)
    out = _unpack_nibbles(blocks["qs"]).astype(np.float32)
    out *= blocks["d"].astype(np.float32)[:, None]  # d * q + m, two roundings as gguf.quants
    out += blocks["m"].astype(np.float32)[:, None]
    return out


# ---- GGUF (llama.cpp naming) -> Hugging Face Llama --------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors llama.cpp adds that have no Hugging Face weight (rope_freqs becomes config.rope_scaling).
_NOT_WEIGHTS = {"rope_freqs.weight"}
# Marker tokens with which chat templates end a turn.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama name of a GGUF tensor; None for tensors that are not weights."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in _NOT_WEIGHTS:
        return None
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight":
        leaf = _LAYER_NAMES.get(parts[2])
        if leaf is not None:
            return f"model.layers.{int(parts[1])}.{leaf}.weight"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no counterpart in a Llama model")


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its rope pairs adjacent dims, HF's rotate_half pairs
    halves); the same reshape as transformers' LlamaTensorProcessor._reverse_permute_weights."""
    # weight: [num_heads * head_dim, in]
    half_head_dim = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, half_head_dim, 2, *weight.shape[1:])
    return np.ascontiguousarray(w.swapaxes(2, 1)).reshape(weight.shape)


def llama_config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    md = gguf.metadata
    arch = md.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf.path}: GGUF architecture {arch!r} is not supported (only 'llama')")

    def get(key: str, default: Any = None) -> Any:
        value = md.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{gguf.path}: GGUF metadata lacks {arch}.{key}")
        if isinstance(value, np.ndarray):
            raise ValueError(f"{gguf.path}: per-layer {arch}.{key} is not supported")
        return value

    tensors = {t.name: t for t in gguf.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{gguf.path}: GGUF has no token_embd.weight")
    hidden_size, num_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = md.get(f"{arch}.attention.key_length") or md.get(f"{arch}.rope.dimension_count")
    rope_theta = float(get("rope.freq_base", 10000.0))
    head_dim = int(head_dim or hidden_size // num_heads)
    max_positions = int(get("context_length"))
    return ModelConfig(
        vocab_size=tensors["token_embd.weight"].shape[0],
        hidden_size=hidden_size,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=rope_theta,
        max_position_embeddings=max_positions,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_token_ids(md),
        rope_scaling=_rope_scaling(gguf, arch, rope_theta, head_dim),
        name=str(md.get("general.name") or gguf.path.stem),
    )


def _eos_token_ids(md: dict[str, Any]) -> tuple[int, ...]:
    """The GGUF's eos id, its end-of-turn/-message ids, and the control token the chat template
    closes a turn with, so that generation stops at the end of an assistant turn."""
    ids = [md.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    template = md.get("tokenizer.chat_template") or ""
    tokens = md.get("tokenizer.ggml.tokens") or []
    token_types = md.get("tokenizer.ggml.token_type")
    for marker in _END_OF_TURN_TOKENS:
        if marker in template and marker in tokens:
            token_id = tokens.index(marker)
            if token_types is None or int(token_types[token_id]) == 3:  # control token
                ids.append(token_id)
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _rope_scaling(gguf: GGUFFile, arch: str, rope_theta: float, head_dim: int) -> dict | None:
    md = gguf.metadata
    kind = md.get(f"{arch}.rope.scaling.type")
    factor = md.get(f"{arch}.rope.scaling.factor")
    if kind is None and md.get(f"{arch}.rope.scale_linear") is not None:  # older files
        kind, factor = "linear", md[f"{arch}.rope.scale_linear"]
    original = md.get(f"{arch}.rope.scaling.original_context_length")
    freqs = next((t for t in gguf.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:  # llama3-style: llama.cpp stores the per-frequency divisors instead
        factors = gguf.dequantize(freqs).astype(np.float64)
        return llama3_rope_scaling_from_factors(factors, rope_theta, head_dim, original or 8192)
    if kind in (None, "none"):
        return None
    if factor is None:
        raise ValueError(f"{gguf.path}: rope scaling {kind!r} without {arch}.rope.scaling.factor")
    if kind == "linear":
        return None if factor == 1.0 else {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        optional = {
            "original_max_position_embeddings": original,
            "attention_factor": md.get(f"{arch}.rope.scaling.attn_factor"),
            "beta_fast": md.get(f"{arch}.rope.scaling.yarn_beta_fast"),
            "beta_slow": md.get(f"{arch}.rope.scaling.yarn_beta_slow"),
        }
        scaling.update({k: v for k, v in optional.items() if v is not None})
        return scaling
    raise ValueError(f"{gguf.path}: rope scaling type {kind!r} is not supported")


def llama3_rope_factors(
    rope_theta: float,
    head_dim: int,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> np.ndarray:
    """The divisors llama.cpp's converter writes as `rope_freqs.weight` for llama3 rope scaling."""
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    factors = 1.0 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < original_max_position_embeddings / high_freq_factor, 1.0, factors)
    return np.where(wavelen > original_max_position_embeddings / low_freq_factor, factor, factors)


def llama3_rope_scaling_from_factors(
    factors: np.ndarray, rope_theta: float, head_dim: int, original_max_position_embeddings: int
) -> dict:
    """Recover HF's llama3 rope_scaling dict from llama.cpp's `rope_freqs` divisors.

    The divisors are 1 (high frequencies), `factor` (low), and in between
    1 / ((1 - s) / factor + s) with s linear in original_max / wavelength; a line through the
    in-between points gives low_freq_factor (intercept) and high - low (slope). The result is
    checked by recomputing the divisors; a file whose divisors are not llama3's is refused.
    """
    factor = float(factors.max())
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    x = original_max_position_embeddings * inv_freq / (2 * np.pi)
    between = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    low, high = 1.0, 4.0  # Llama 3.x values, used when there are too few points to fit
    if between.sum() >= 2 and factor > 1:
        smooth = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(smooth, x[between], 1)
        low, high = round(float(intercept), 4), round(float(intercept + slope), 4)
    scaling = {
        "rope_type": "llama3",
        "factor": round(factor, 6),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": int(original_max_position_embeddings),
    }
    expected = llama3_rope_factors(
        rope_theta, head_dim, **{k: v for k, v in scaling.items() if k != "rope_type"}
    )
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-4):
        raise ValueError("rope_freqs.weight does not follow llama3 rope scaling; not supported")
    return scaling


def weight_tensors(gguf: GGUFFile, projections: bool = True) -> list[tuple[TensorInfo, str]]:
    """The file's weight tensors with their Hugging Face names, in file order; without the
    projection matrices if `projections` is False."""
    return [
        (info, name)
        for info in gguf.tensors
        if (name := hf_name(info.name)) is not None and (projections or not is_projection(name))
    ]


def llama_weights_from_gguf(
    gguf: GGUFFile,
    config: ModelConfig,
    on_tensor: Callable[[str], None] | None = None,
    projections: bool = True,
) -> dict[str, np.ndarray]:
    """Dequantized float32 weights under Hugging Face names, Q/K rows un-permuted; without the
    projection matrices if `projections` is False (`safetensors_dir.is_projection`).

    Tensors are dequantized on a thread pool (numpy releases the GIL); `on_tensor(name)` is
    called once per tensor as it completes, in order.
    """
    work = weight_tensors(gguf, projections)
    for info, _ in work:  # fail before any work on an unsupported type
        _layout(info)

    def convert(item: tuple[TensorInfo, str]) -> np.ndarray:
        info, name = item
        values = gguf.dequantize(info)
        if name.endswith("q_proj.weight"):
            values = unpermute_rope_rows(values, config.num_heads)
        elif name.endswith("k_proj.weight"):
            values = unpermute_rope_rows(values, config.num_kv_heads)
        elif not values.flags.writeable:  # an F32 view of the read-only map
            values = values.copy()
        return values

    weights = {}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for (_, name), values in zip(work, pool.map(convert, work), strict=True):
            weights[name] = values
            if on_tensor is not None:
                on_tensor(name)
    return weights
