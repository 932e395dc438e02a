"""Opt-in KV compression on the wire: int8 with one scale per (layer, K or V, head) of a block.

A block is ``[layers, 2, block_size, kv_heads, head_dim]`` in the model's dtype
(pdserve.kv.blocks). Encoded, it is the fp32 scales ``[layers, 2, kv_heads]`` followed by the
int8 values in the block's own layout, ``q = round(x / scale)`` with
``scale = max|x| / 127`` over the head's tokens and dimensions, so each value is off by at
most half its head's scale. An fp32 block shrinks about 4x, a bf16 or fp16 block about 2x.

The store keeps exact blocks; only a reader that asks for it gets the encoding, and it
decodes to the model's dtype before the engine sees the bytes. Pure numpy: the kvstore does
not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class KVGeometry:
    """The shape of one KV block, as the engine lays it out."""

    num_layers: int
    block_size: int  # tokens
    num_kv_heads: int
    head_dim: int
    dtype: str  # float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {self.dtype!r}")
        if min(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim) < 1:
            raise ValueError(f"every dimension of a KV block must be >= 1: {self}")

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_nbytes(self) -> int:
        return int(np.prod(self.shape)) * (4 if self.dtype == "float32" else 2)

    @property
    def int8_nbytes(self) -> int:
        """Bytes of a block encoded as int8: the scales, then one byte per value."""
        return self.num_layers * 2 * self.num_kv_heads * 4 + int(np.prod(self.shape))


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return raw.view(np.float32)
    if dtype == "float16":
        return raw.view(np.float16).astype(np.float32)
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)  # bf16: top half


def _from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return values.astype(np.float32)
    if dtype == "float16":
        return values.astype(np.float16)
    bits = values.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest even, as torch does
    return (rounded >> 16).astype(np.uint16)


def encode_int8(block, geometry: KVGeometry) -> bytes:
    """The int8 encoding of one block's bytes (``geometry.int8_nbytes`` long)."""
    if len(block) != geometry.block_nbytes:
        raise ValueError(f"a KV block is {geometry.block_nbytes} bytes, got {len(block)}")
    x = _to_float32(np.frombuffer(block, dtype=np.uint8), geometry.dtype).reshape(geometry.shape)
    # x: [L, 2, T, H, D]; one scale per (L, 2, H)
    scales = np.abs(x).max(axis=(2, 4)) / 127.0  # [L, 2, H]
    safe = np.where(scales > 0, scales, 1.0)[:, :, None, :, None]
    q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
    return scales.astype(np.float32).tobytes() + q.tobytes()


def decode_int8(payload, geometry: KVGeometry) -> bytes:
    """The block's bytes in the model's dtype, from :func:`encode_int8`'s output."""
    if len(payload) != geometry.int8_nbytes:
        raise ValueError(f"an int8 KV block is {geometry.int8_nbytes} bytes, got {len(payload)}")
    g = geometry
    num_scales = g.num_layers * 2 * g.num_kv_heads
    scales = np.frombuffer(payload, dtype=np.float32, count=num_scales)
    scales = scales.reshape(g.num_layers, 2, 1, g.num_kv_heads, 1)
    q = np.frombuffer(payload, dtype=np.int8, offset=num_scales * 4).reshape(g.shape)
    return _from_float32(q.astype(np.float32) * scales, g.dtype).tobytes()
