"""Same-host shared memory: the kvstore's DRAM pool is a file under /dev/shm that readers
on the same host map, so block bytes move with one memcpy and never cross a socket.

Plain ``mmap`` of a named file rather than ``multiprocessing.shared_memory``: on Python
< 3.13 attaching to the latter registers the segment with the reader's resource tracker,
which unlinks the store's memory when the reader exits.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
from pathlib import Path


def host_id() -> str:
    """Identifies this host (and boot): two processes may share memory iff their ids match."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "noboot"
    return f"{socket.gethostname()}/{boot}"


_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14
_ZERO_CHUNK_BYTES = 1 << 24


def _populate(mapping: mmap.mmap, size_bytes: int) -> None:
    """Fault in (and so clear) every page now. fallocate on tmpfs allocates pages but leaves
    them to be cleared at their first fault: without this, the first write into each block
    slot (a prefill worker's put, on its compute core) pays the clear: 3-4 ms per MB measured
    on a VM whose host backs the page at that moment too."""
    try:
        mapping.madvise(_MADV_POPULATE_WRITE, 0, size_bytes)
    except (OSError, ValueError):  # an older kernel: touch every page by writing zeros
        zeros = bytes(_ZERO_CHUNK_BYTES)
        with memoryview(mapping) as view:
            for start in range(0, size_bytes, _ZERO_CHUNK_BYTES):
                view[start : start + _ZERO_CHUNK_BYTES] = zeros[: size_bytes - start]


class SharedSegment:
    """A fixed-size shared mapping. The creator owns (and unlinks) the file."""

    def __init__(self, path: Path, size_bytes: int, mapping: mmap.mmap, owner: bool) -> None:
        self.path = path
        self.size_bytes = size_bytes
        self._mmap = mapping
        self._owner = owner
        self.view = memoryview(mapping)

    @classmethod
    def create(cls, path: Path, size_bytes: int) -> SharedSegment:
        """Create and fully allocate a segment (pages are committed now, not on first put)."""
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size_bytes)
            with contextlib.suppress(OSError):  # not every filesystem supports it
                os.posix_fallocate(fd, 0, size_bytes)
            mapping = mmap.mmap(fd, size_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            _populate(mapping, size_bytes)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return cls(path, size_bytes, mapping, owner=True)

    @classmethod
    def attach(cls, path: Path, size_bytes: int, *, writable: bool = True) -> SharedSegment:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mapping = mmap.mmap(fd, size_bytes, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        return cls(path, size_bytes, mapping, owner=False)

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(
            BufferError
        ):  # a caller still holds a slice; the OS reclaims it at exit
            self._mmap.close()
        if self._owner:
            self.path.unlink(missing_ok=True)
