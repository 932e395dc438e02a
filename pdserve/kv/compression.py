"""Opt-in KV compression on the wire: int8 with one scale per (layer, K or V, head) of a block.

A block is ``[layers, 2, block_size, kv_heads, head_dim]`` in the model's dtype
(pdserve.kv.blocks). Encoded, it is the fp32 scales ``[layers, 2, kv_heads]`` followed by the
int8 values in the block's own layout, ``q = round(x / scale)`` with
``scale = max|x| / 127`` over the head's tokens and dimensions, so each value is off by at
most half its head's scale. An fp32 block shrinks about 4x, a bf16 or fp16 block about 2x.

The store keeps exact blocks; only a reader that asks for it gets the encoding, and it
decodes to the model's dtype before the engine sees the bytes. torch on the CPU does the
arithmetic (bf16 natively; numpy has no bf16 and decoded bf16 blocks 6x slower).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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
        return math.prod(self.shape) * (4 if self.dtype == "float32" else 2)

    @property
    def int8_nbytes(self) -> int:
        """Bytes of a block encoded as int8: the scales, then one byte per value."""
        return self.num_layers * 2 * self.num_kv_heads * 4 + math.prod(self.shape)


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def encode_int8(block, geometry: KVGeometry) -> bytes:
    """The int8 encoding of one block's bytes (``geometry.int8_nbytes`` long)."""
    if len(block) != geometry.block_nbytes:
        raise ValueError(f"a KV block is {geometry.block_nbytes} bytes, got {len(block)}")
    raw = torch.frombuffer(bytearray(block), dtype=torch.uint8)
    x = raw.view(_TORCH_DTYPES[geometry.dtype]).view(geometry.shape)  # [L, 2, T, H, D]
    scales = x.abs().amax(dim=(2, 4), keepdim=True).float() / 127  # [L, 2, 1, H, 1]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(x.float() / safe).clamp_(-127, 127).to(torch.int8)
    return scales.numpy().tobytes() + q.numpy().tobytes()


def decode_int8(payload, geometry: KVGeometry) -> bytes:
    """The block's bytes in the model's dtype, from :func:`encode_int8`'s output."""
    if len(payload) != geometry.int8_nbytes:
        raise ValueError(f"an int8 KV block is {geometry.int8_nbytes} bytes, got {len(payload)}")
    g, buf = geometry, bytearray(payload)
    num_scales = g.num_layers * 2 * g.num_kv_heads
    scales = torch.frombuffer(buf, dtype=torch.float32, count=num_scales)
    scales = scales.view(g.num_layers, 2, 1, g.num_kv_heads, 1)
    q = torch.frombuffer(buf, dtype=torch.int8, offset=num_scales * 4).view(g.shape)
    x = (q.to(torch.float32) * scales).to(_TORCH_DTYPES[g.dtype])
    return x.view(torch.uint8).numpy().tobytes()
