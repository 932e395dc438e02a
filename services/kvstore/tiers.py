"""Tier backends: where a block's bytes physically live. No policy here.

- :class:`SlabPool`: fixed block-sized slots in one preallocated buffer (the DRAM tier and
  the staging area share one shared-memory segment, in disjoint slot ranges). Allocation is a
  pop from a free list: no allocation per put.
- :class:`SsdDir`: one file per block, written to a temporary name and renamed (atomic),
  with a header carrying key, length and checksum, so a restart can re-index the directory.
- :class:`CudaSlabPool`: the HBM tier, slots in one CUDA tensor (only built when CUDA exists).

Callers (the store) hold the directory lock around ``allocate``/``free`` and never around
``write``/``read``, which copy bytes.
"""

from __future__ import annotations

import collections
import contextlib
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import xxhash

from pdserve.kv.blocks import BLOCK_KEY_BYTES, BlockKey
from pdserve.kv.memcopy import copy_hashed, copy_into

_HEADER = struct.Struct("<4sHH16sQQ")  # magic, version, reserved, key, length, checksum
_MAGIC = b"PDKV"
_VERSION = 1


class SlabPool:
    """``num_slots`` slots of ``slot_bytes`` starting at ``base_offset`` of ``buffer``."""

    def __init__(
        self, buffer: memoryview, base_offset: int, num_slots: int, slot_bytes: int
    ) -> None:
        self._buffer = buffer
        self.base_offset = base_offset
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self._free: collections.deque[int] = collections.deque(range(num_slots))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        try:
            return self._free.popleft()
        except IndexError:
            return None

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def offset(self, slot: int) -> int:
        """Byte offset of a slot in the whole buffer (what a shared-memory reader maps)."""
        return self.base_offset + slot * self.slot_bytes

    def view(self, slot: int) -> memoryview:
        start = self.offset(slot)
        return self._buffer[start : start + self.slot_bytes]

    def write(self, slot: int, data, offset: int = 0, hasher: xxhash.xxh3_64 | None = None) -> None:
        """Copy ``data`` into the slot at ``offset`` without holding the GIL; with ``hasher``,
        also feed it the bytes as they land (pdserve.kv.memcopy)."""
        start = self.offset(slot) + offset
        target = self._buffer[start : start + len(data)]
        if hasher is None:
            copy_into(target, data)
        else:
            copy_hashed(data, target, hasher)

    def read(self, slot: int) -> memoryview:
        return self.view(slot)


class CudaSlabPool:
    """HBM slots in one ``uint8`` CUDA tensor ``[num_slots, slot_bytes]``."""

    def __init__(self, num_slots: int, slot_bytes: int, device: str = "cuda") -> None:
        import torch  # only on nodes with an HBM tier

        self._torch = torch
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self._slots = torch.empty((num_slots, slot_bytes), dtype=torch.uint8, device=device)
        self._free: collections.deque[int] = collections.deque(range(num_slots))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        try:
            return self._free.popleft()
        except IndexError:
            return None

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def write(self, slot: int, data, offset: int = 0) -> None:
        host = self._torch.frombuffer(
            bytearray(data) if isinstance(data, bytes) else data, dtype=self._torch.uint8
        )
        self._slots[slot, offset : offset + len(host)].copy_(host)

    def read(self, slot: int) -> memoryview:
        return memoryview(self._slots[slot].cpu().numpy()).cast("B")


@dataclass(frozen=True)
class SsdRecord:
    key: BlockKey
    checksum: int
    mtime_ns: int


class CorruptFileError(Exception):
    """A block file whose header or length is wrong."""


class SsdDir:
    """Block files under ``root/<2 hex>/<32 hex>.blk``; ``capacity_blocks`` is enforced by the store."""

    def __init__(self, root: Path, block_size_bytes: int, *, fsync: bool = False) -> None:
        self.root = root
        self.block_size_bytes = block_size_bytes
        self.fsync = fsync
        root.mkdir(parents=True, exist_ok=True)

    def path(self, key: BlockKey) -> Path:
        name = key.hex()
        return self.root / name[:2] / f"{name}.blk"

    def write(self, key: BlockKey, data, checksum: int) -> None:
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, _VERSION, 0, key, len(data), checksum))
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)

    def read(self, key: BlockKey) -> tuple[bytearray, int]:
        """(payload, checksum from the header); raises FileNotFoundError or CorruptFileError."""
        with open(self.path(key), "rb") as f:
            header = f.read(_HEADER.size)
            stored_key, length, checksum = self._parse(header)
            if stored_key != key or length != self.block_size_bytes:
                raise CorruptFileError(f"{self.path(key)}: header names another block")
            data = bytearray(length)
            if f.readinto(data) != length or f.read(1):
                raise CorruptFileError(f"{self.path(key)}: length is not {length} bytes")
        return data, checksum

    def discard(self, key: BlockKey) -> None:
        self.path(key).unlink(missing_ok=True)

    def scan(self) -> list[SsdRecord]:
        """Every valid block file, oldest first; temporary and malformed files are removed."""
        records = []
        for path in self.root.glob("*/*"):
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                continue
            try:
                with open(path, "rb") as f:
                    key, length, checksum = self._parse(f.read(_HEADER.size))
                size_ok = path.stat().st_size == _HEADER.size + length
                if (
                    length != self.block_size_bytes
                    or not size_ok
                    or path != self.path(BlockKey(key))
                ):
                    raise CorruptFileError(str(path))
            except (CorruptFileError, OSError):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            records.append(SsdRecord(BlockKey(key), checksum, path.stat().st_mtime_ns))
        records.sort(key=lambda r: r.mtime_ns)
        return records

    @staticmethod
    def _parse(header: bytes) -> tuple[bytes, int, int]:
        if len(header) != _HEADER.size:
            raise CorruptFileError("short header")
        magic, version, _, key, length, checksum = _HEADER.unpack(header)
        if magic != _MAGIC or version != _VERSION or len(key) != BLOCK_KEY_BYTES:
            raise CorruptFileError("bad magic or version")
        return key, length, checksum
