"""Weight-only quantized linear layers for the CPU, built from a GGUF file's own blocks.

Precision modes (`EngineConfig.quantization`):
- ``none``: every weight dequantized to the engine dtype; in fp32 this is the exact path that
  matches Hugging Face token for token.
- ``int4``: 4-bit weights in groups of 32 along the input dimension, run by PyTorch's
  `_weight_int4pack_mm_for_cpu`. A Q4_1 block (w = d·q + m) maps onto the kernel's
  (q − 8)·scale + zero with scale = d and zero = m + 8·d, and a Q4_0 block (w = d·(q − 8)) with
  zero = 0, so the file's 4-bit weights run as they are; other types are grouped anew from their
  values (min/max per group). 8-bit tensors (Q8_0, e.g. SmolLM2's tied embedding) stay 8-bit.
- ``int8``: int8 weights with one scale per output row (`_weight_int8pack_mm`), requantized from
  the dequantized values.
- ``auto``: the fastest mode whose quality the quality benchmark found no worse than llama.cpp's
  on the same file (`benchmarks/quality.py`): int4 where the CPU computes bf16 natively
  (AVX512-BF16 or AMX), otherwise the exact fp32 path.

The kernels take bf16 activations (their fp32 variants are scalar loops, ~100× slower), so
quantized modes compute in bf16; the KV cache follows the compute dtype.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pdserve import cpu_kernels
from pdserve.cpu_kernels import cpu_flags
from pdserve.model.config import ModelConfig
from pdserve.model.gguf_reader import (
    Q4_0,
    Q4_1,
    GGUFFile,
    TensorInfo,
    read_gguf,
    unpermute_rope_rows,
)

QUANTIZATION_MODES = ("auto", "none", "int8", "int4")
INT4_GROUP_SIZE = 32  # the GGUF 4-bit block: 32 weights share a scale and a minimum
# PyTorch's weight-only kernels are the fastest for a few rows and slow for many (they re-read
# the weights per row): benchmarks/cpu_kernels.py, every projection of SmolLM2 at once on the
# Xeon, int4 took 26.0 ms at 8 rows against 29.9 ms for the native kernel and 36.7 ms for the
# dense bf16 copy. More rows run the native kernel, or the dense copy where it does not load.
MAX_QUANTIZED_ROWS = 8
# Bump when what `state()` holds changes (it keys the cache entry).
STATE_FORMAT = 3
# The int4 kernel packs rows in tiles of 16 and needs an input width that fills its k-tiles.
_INT4_ROW_MULTIPLE = 16
_Q4_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
_Q4_1_BLOCK = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def dense_dtype() -> torch.dtype:
    """The dtype of the quantized projections' dense copies (inputs of many rows): bf16 where the
    CPU multiplies bf16 natively and PyTorch runs its AVX-512 code; fp32 elsewhere, where
    oneDNN's bf16 products ran 2.3-4.1x slower than fp32 ones at 8-512 rows (AVX2 code paths,
    benchmarks/cpu_kernels.py). The values are the bf16 ones either way."""
    if native_bf16() and torch.backends.cpu.get_cpu_capability() == "AVX512":
        return torch.bfloat16
    return torch.float32


def dense_product(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """x · denseᵀ in the dense copy's dtype, returned in x's."""
    if x.dtype == dense.dtype:
        return F.linear(x, dense)
    return F.linear(x.to(dense.dtype), dense).to(x.dtype)


def resolve_quantization(requested: str, device: torch.device, flags=None) -> str:
    """The mode `requested` stands for on this device: `auto` becomes int4 on a CPU whose
    vector units PyTorch's int4 kernel uses (AVX2 with FMA, or native bf16) and none elsewhere
    (a GPU runs the dense weights)."""
    if requested not in QUANTIZATION_MODES:
        raise ValueError(
            f"quantization must be one of {', '.join(QUANTIZATION_MODES)}; got {requested!r}"
        )
    if requested != "auto":
        if requested != "none" and device.type != "cpu":
            raise ValueError(f"quantization {requested!r} runs on the CPU only")
        return requested
    flags = cpu_flags() if flags is None else flags
    vectorized = {"avx2", "fma"} <= flags or native_bf16(flags)
    return "int4" if device.type == "cpu" and vectorized else "none"


def compute_dtype(mode: str, requested: torch.dtype) -> torch.dtype:
    """Activations (and KV cache) dtype: the requested one for dense weights, bf16 for the
    quantized kernels."""
    return requested if mode == "none" else torch.bfloat16


def variant_fingerprint(fingerprint: str, mode: str) -> str:
    """The checkpoint's fingerprint for the exact path; a derived one for a quantized mode (its
    KV blocks differ, so they must never be reused by the exact path or another mode)."""
    if mode == "none":
        return fingerprint
    return hashlib.blake2b(f"{fingerprint}:{mode}".encode(), digest_size=16).hexdigest()


# ---- linear layers -----------------------------------------------------------------------


class Linear(ABC):
    """y = x · Wᵀ for x [T, in] → [T, out], whatever W's storage."""

    kind: str
    out_features: int

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of weight read per call (what bounds a batch-1 decode step)."""


class DenseLinear(Linear):
    kind = "dense"

    def __init__(self, weight: torch.Tensor):  # [out, in]
        self.weight = weight.contiguous()
        self.out_features = weight.shape[0]

    def __call__(self, x):
        return F.linear(x, self.weight)

    @property
    def nbytes(self):
        return self.weight.numel() * self.weight.element_size()


class Int8Linear(Linear):
    """int8 weights, one bf16 scale per output row, run by PyTorch's kernel up to
    MAX_QUANTIZED_ROWS rows; more rows run `dense`, the source weights in bf16. For SmolLM2's
    output projection those are the file's Q8_0 values (a scale per 32 weights), closer to the
    model than one scale per row: in batches of 16 decode rows, greedy agreement with fp32 was
    34.1 of 64 tokens with them and 27.5 with the per-row int8 weights (benchmarks/peers.py's
    quality prompts), so no native int8 product is used here."""

    kind = "int8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dense: torch.Tensor):
        # [out, in] int8, [out], and the same weights dense in bf16 for many-row inputs
        self.qweight = qweight.contiguous()
        self.scales = scales.to(torch.bfloat16).contiguous()
        self.dense = dense
        self.out_features = qweight.shape[0]

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Linear:
        """Symmetric per-row int8 of a float [out, in] weight."""
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.bfloat16).tiny)
        scales = scales.to(torch.bfloat16).float()  # round to the scale the kernel will use
        q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
        return cls(q, scales, w.to(torch.bfloat16).to(dense_dtype()))

    def __call__(self, x):
        if x.shape[0] <= MAX_QUANTIZED_ROWS:
            return torch._weight_int8pack_mm(x, self.qweight, self.scales)
        return dense_product(x, self.dense)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the dense copy ([T] → [T, in]): the embedding lookup of a tied table."""
        return F.embedding(ids, self.dense).to(dtype)

    def state(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales, "dense": self.dense}

    @property
    def nbytes(self):
        return self.qweight.numel() + self.scales.numel() * 2


class Int4Linear(Linear):
    """4-bit weights in groups of INT4_GROUP_SIZE input columns: w = q · scale + min, q in 0..15.

    Three forms of the same weights, one per row count (measured in benchmarks/cpu_kernels.py):
    - up to MAX_QUANTIZED_ROWS rows: PyTorch's int4 kernel on its own packed layout, with bf16
      scale and zero ((q − 8) · scale + zero, zero = min + 8 · scale). That layout differs
      between CPU kinds (AVX-512, AVX2), so a cached copy is keyed by the CPU capability;
    - up to the kernels' `max_product_rows` (128; 12 on AVX2): pdserve's native kernel on the
      GGUF's own blocks (`blocks`: nibbles in GGUF order, fp32 scales and minimums), which
      dequantizes each weight once per call however many rows run against it;
    - more rows (prefill chunks): a dense copy, bf16 or fp32 (`dense_dtype`)."""

    kind = "int4"

    def __init__(self, packed, scales_and_zeros, blocks: Int4Blocks, dense: torch.Tensor):
        # packed [out, in / 2] uint8 (torch's layout); scales_and_zeros [in / group, out, 2]
        # bf16; dense [out, in] bf16
        self.packed = packed
        self.scales_and_zeros = scales_and_zeros
        self.blocks = blocks
        self.dense = dense
        self.out_features = packed.shape[0]
        self._native = _native_products(blocks.qs.shape[1] * 2, self.out_features)

    @classmethod
    def from_parts(cls, q: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> Int4Linear:
        # q [out, in] uint8 in 0..15; scales, zeros [out, in / group] float32
        out_features, in_features = q.shape
        if out_features % _INT4_ROW_MULTIPLE or in_features % INT4_GROUP_SIZE:
            raise ValueError(f"int4 needs out % 16 == 0 and in % 32 == 0, got {q.shape}")
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.from_numpy(q.astype(np.int32)), 1
        )
        pairs = np.stack([scales, zeros], axis=-1).transpose(1, 0, 2)  # [in / group, out, 2]
        halves = q.reshape(out_features, -1, 2, INT4_GROUP_SIZE // 2)
        blocks = Int4Blocks(
            torch.from_numpy((halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(out_features, -1)),
            torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(zeros - 8 * scales, dtype=np.float32)),
        )
        pairs = torch.from_numpy(np.ascontiguousarray(pairs)).to(torch.bfloat16)
        return cls(packed, pairs, blocks, blocks.dense().to(dense_dtype()))

    @classmethod
    def quantize(cls, weight: np.ndarray) -> Int4Linear:
        """Asymmetric 4-bit groups (min/max) of a float32 [out, in] weight."""
        return cls.from_parts(*_int4_from_values(weight))

    def __call__(self, x):
        rows = x.shape[0]
        if rows <= MAX_QUANTIZED_ROWS:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self.packed, INT4_GROUP_SIZE, self.scales_and_zeros
            )
        if self._native is not None and rows <= self._native.max_product_rows:
            b = self.blocks
            return self._native.int4_linear(x.contiguous(), b.qs, b.scales, b.mins)
        return dense_product(x, self.dense)

    @property
    def runs_native(self) -> bool:
        """Whether products of MAX_QUANTIZED_ROWS < rows ≤ the kernels' `max_product_rows` run
        the native kernel."""
        return self._native is not None

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "packed": self.packed,
            "scales_and_zeros": self.scales_and_zeros,
            "qs": self.blocks.qs,
            "block_scales": self.blocks.scales,
            "block_mins": self.blocks.mins,
            "dense": self.dense,
        }

    @property
    def nbytes(self):
        return self.packed.numel() + self.scales_and_zeros.numel() * 2


@dataclass
class Int4Blocks:
    qs: torch.Tensor  # [out, in / 2] uint8: per group, byte j holds element j and j + 16
    scales: torch.Tensor  # [out, in / group] fp32
    mins: torch.Tensor  # [out, in / group] fp32

    def dense(self) -> torch.Tensor:
        """The weights as bf16 [out, in]: natively where the kernels load (about 10× faster
        than the torch ops, a large part of a first load), else with torch ops."""
        native = cpu_kernels.kernels()
        if native is not None:
            return native.int4_dequantize(self.qs, self.scales, self.mins)
        out_features = self.qs.shape[0]
        groups = self.qs.view(out_features, -1, INT4_GROUP_SIZE // 2)
        q = torch.cat([groups & 0x0F, groups >> 4], dim=-1).float()  # [out, in / group, 32]
        weights = q * self.scales[..., None] + self.mins[..., None]
        return weights.view(out_features, -1).to(torch.bfloat16)


def _native_products(in_features: int, out_features: int):
    """The native kernels for a projection of this shape, where they load and fit the shape."""
    native = cpu_kernels.kernels()
    if (
        native is None
        or in_features % cpu_kernels.GROUP_SIZE
        or out_features % cpu_kernels.OUT_MULTIPLE
    ):
        return None
    return native


def linear_from_state(state: dict[str, torch.Tensor]) -> Linear:
    """The inverse of `state()`: an Int4Linear or Int8Linear from its saved tensors (used as
    given: PyTorch's weight-only kernels need the allocator's alignment, which `tensor_file`
    gives mapped tensors too)."""
    if "packed" in state:
        blocks = Int4Blocks(state["qs"], state["block_scales"], state["block_mins"])
        return Int4Linear(state["packed"], state["scales_and_zeros"], blocks, state["dense"])
    return Int8Linear(state["qweight"], state["scales"], state["dense"])


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """[blocks, 16] packed bytes → [blocks, 32]: low nibbles are elements 0..15, high 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _int4_from_blocks(raw: np.ndarray, ggml_type: int, shape: tuple[int, int]):
    out_features, in_features = shape
    groups = in_features // INT4_GROUP_SIZE
    block = _Q4_1_BLOCK if ggml_type == Q4_1 else _Q4_0_BLOCK
    blocks = raw.view(block).reshape(out_features, groups)
    q = _unpack_nibbles(blocks["qs"].reshape(-1, 16)).reshape(out_features, in_features)
    d = blocks["d"].astype(np.float32)
    # Q4_1: w = d·q + m = (q − 8)·d + (m + 8·d); Q4_0: w = (q − 8)·d
    zeros = blocks["m"].astype(np.float32) + 8 * d if ggml_type == Q4_1 else np.zeros_like(d)
    return q, d, zeros


def _int4_from_values(weight: np.ndarray):
    out_features, in_features = weight.shape
    w = weight.astype(np.float32).reshape(out_features, -1, INT4_GROUP_SIZE)
    low, high = w.min(axis=-1), w.max(axis=-1)
    scales = np.maximum((high - low) / 15, np.finfo(np.float32).tiny)
    q = np.clip(np.rint((w - low[..., None]) / scales[..., None]), 0, 15).astype(np.uint8)
    return q.reshape(out_features, in_features), scales, low + 8 * scales


# ---- a model's quantized projections ----------------------------------------------------

_PROJECTIONS = {  # fused projection → its parts, in order (GGUF names, Hugging Face names)
    "qkv": (
        ("attn_q", "attn_k", "attn_v"),
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ),
    "o": (("attn_output",), ("self_attn.o_proj",)),
    "gate_up": (("ffn_gate", "ffn_up"), ("mlp.gate_proj", "mlp.up_proj")),
    "down": (("ffn_down",), ("mlp.down_proj",)),
}
HEAD = "lm_head"


def linear_names(config: ModelConfig) -> list[str]:
    """Keys of a quantized model's projections: "layers.{i}.{qkv|o|gate_up|down}" and HEAD."""
    return [f"layers.{i}.{fused}" for i in range(config.num_layers) for fused in _PROJECTIONS] + [
        HEAD
    ]


def quantize_gguf(path: Path, config: ModelConfig, mode: str) -> dict[str, Linear]:
    """Every projection of the GGUF at `path` in `mode` ("int8" or "int4"), fused as the model
    runs them (see `linear_names`)."""
    gguf = read_gguf(path)
    tensors = {t.name: t for t in gguf.tensors}
    # The output projection first: it is the largest by far, and started last it left one
    # thread working alone at the end.
    parts_of = {HEAD: [tensors.get("output.weight", tensors["token_embd.weight"])]}
    for i in range(config.num_layers):
        for fused, (parts, _) in _PROJECTIONS.items():
            parts_of[f"layers.{i}.{fused}"] = [tensors[f"blk.{i}.{part}.weight"] for part in parts]
    # One projection per thread: numpy and torch release the GIL for the bulk of the work, so a
    # first load runs on every core the engine has.
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        built = pool.map(lambda infos: _fused_linear(gguf, infos, config, mode), parts_of.values())
        return dict(zip(parts_of, built, strict=True))


def quantize_weights(
    weights: dict[str, torch.Tensor], config: ModelConfig, mode: str
) -> dict[str, Linear]:
    """The same from float weights under Hugging Face names (a safetensors checkpoint)."""

    def quantize(w: torch.Tensor) -> Linear:
        if mode == "int4":
            return Int4Linear.quantize(w.float().numpy())
        return Int8Linear.quantize(w)

    linears = {}
    for i in range(config.num_layers):
        for fused, (_, parts) in _PROJECTIONS.items():
            w = torch.cat([weights[f"model.layers.{i}.{part}.weight"] for part in parts])
            linears[f"layers.{i}.{fused}"] = quantize(w)
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    linears[HEAD] = Int8Linear.quantize(head)  # the output projection decides every token
    return linears


def _fused_linear(gguf: GGUFFile, infos: list[TensorInfo], config: ModelConfig, mode: str):
    """One Linear over the row-wise concatenation of `infos`. 4-bit blocks go straight in;
    anything else is quantized from its values (8-bit tensors to int8 in either mode)."""
    if mode == "int4" and all(i.ggml_type in (Q4_0, Q4_1) for i in infos):
        parts = [_int4_from_blocks(gguf.raw(i), i.ggml_type, i.shape) for i in infos]
        parts = [_unpermute(i, p, config) for i, p in zip(infos, parts, strict=True)]
        q, scales, zeros = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
        return Int4Linear.from_parts(q, scales, zeros)
    values = np.concatenate([_unpermute(i, (gguf.dequantize(i),), config)[0] for i in infos])
    if mode == "int4" and not _is_8bit(infos):
        return Int4Linear.quantize(values)
    return Int8Linear.quantize(torch.from_numpy(values))


def _is_8bit(infos: list[TensorInfo]) -> bool:
    return any(i.type_name.startswith(("Q8", "F", "BF")) for i in infos)


def _unpermute(info: TensorInfo, arrays: tuple[np.ndarray, ...], config: ModelConfig):
    """Undo llama.cpp's Q/K row order in every per-row array (a row permutation moves the
    row's blocks, scales and minimums together)."""
    kind = info.name.split(".")[2] if info.name.startswith("blk.") else None
    heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}.get(kind)
    if heads is None:
        return arrays
    return tuple(unpermute_rope_rows(a, heads) for a in arrays)
