"""KV block codec: keys, tiers, checksums, chunking, and piece-wise assembly.

A block is ``block_size_bytes`` opaque bytes (K and V of ``block_size`` tokens for every
layer, laid out ``[layers, 2, block_size, kv_heads, head_dim]`` by the engine) named by a
16-byte key. Blocks are immutable; a reader checks length and checksum before use.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from pdserve.engine.block_hash import BLOCK_KEY_BYTES, BlockKey
from pdserve.kv.errors import ChunkOrderError, InvalidBlockError


class Tier(enum.IntEnum):
    """Storage tier, fastest first; values equal the wire enum ``pdserve.v1.Tier``."""

    HBM = 1
    DRAM = 2
    SSD = 3

    @property
    def label(self) -> str:
        return self.name.lower()


def block_key(raw: bytes) -> BlockKey:
    """Validate and brand 16 raw bytes as a block key."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise InvalidBlockError(f"block key must be bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if len(raw) != BLOCK_KEY_BYTES:
        raise InvalidBlockError(f"block key must be {BLOCK_KEY_BYTES} bytes, got {len(raw)}")
    return BlockKey(raw)


def checksum(data: bytes | bytearray | memoryview) -> int:
    """xxh3-64 of a whole block (tens of GB/s, so readers can always afford to verify)."""
    return xxhash.xxh3_64_intdigest(data)


def block_nbytes(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype_size: int
) -> int:
    """Bytes in one block: ``[layers, 2, block_size, kv_heads, head_dim]`` of the model dtype."""
    return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype_size


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_block_nbytes(model: str | Path | None, dtype: str, block_size: int) -> int:
    """Bytes in one block of ``model`` (a GGUF file or safetensors directory; None: the default
    model) in ``dtype``, read from its config alone (no weights): the geometry the engine uses."""
    from pdserve.model.gguf_reader import llama_config_from_gguf, read_gguf
    from pdserve.model.loader import _resolve_gguf, default_model_path
    from pdserve.model.safetensors_dir import is_checkpoint_dir, read_config

    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPE_BYTES)}; got {dtype!r}")
    source = Path(model) if model is not None else default_model_path()
    if is_checkpoint_dir(source):
        config = read_config(source)
    else:
        config = llama_config_from_gguf(read_gguf(_resolve_gguf(source)))
    return block_nbytes(
        config.num_layers, block_size, config.num_kv_heads, config.head_dim, _DTYPE_BYTES[dtype]
    )


def iter_chunks(data: memoryview, chunk_bytes: int) -> Iterator[tuple[int, memoryview]]:
    """(offset, slice) pieces of ``data``, each at most ``chunk_bytes`` long."""
    for offset in range(0, len(data), chunk_bytes):
        yield offset, data[offset : offset + chunk_bytes]


@dataclass
class PieceTracker:
    """Byte ranges of one block received so far; rejects overlaps and overruns.

    Pieces may arrive in any order (the prefill worker sends one layer's slice as soon as
    that layer is computed). Ranges are kept sorted and merged, so the list stays short.
    """

    key: BlockKey
    block_size_bytes: int
    ranges: list[tuple[int, int]]

    @classmethod
    def empty(cls, key: BlockKey, block_size_bytes: int) -> PieceTracker:
        return cls(key, block_size_bytes, [])

    def add(self, offset: int, length: int) -> None:
        end = offset + length
        if length <= 0:
            raise ChunkOrderError(f"empty chunk for block {self.key.hex()} at offset {offset}")
        if offset < 0 or end > self.block_size_bytes:
            raise InvalidBlockError(
                f"chunk [{offset}, {end}) of block {self.key.hex()} runs past the block size "
                f"{self.block_size_bytes} bytes"
            )
        for start, stop in self.ranges:
            if offset < stop and start < end:
                raise ChunkOrderError(
                    f"chunk [{offset}, {end}) of block {self.key.hex()} overlaps bytes "
                    f"[{start}, {stop}) already received"
                )
        self.ranges.append((offset, end))
        self.ranges.sort()
        merged = [self.ranges[0]]
        for start, stop in self.ranges[1:]:
            if start == merged[-1][1]:
                merged[-1] = (merged[-1][0], stop)
            else:
                merged.append((start, stop))
        self.ranges = merged

    def fill(self) -> None:
        self.ranges = [(0, self.block_size_bytes)]

    @property
    def num_received_bytes(self) -> int:
        return sum(stop - start for start, stop in self.ranges)

    @property
    def complete(self) -> bool:
        return self.ranges == [(0, self.block_size_bytes)]
