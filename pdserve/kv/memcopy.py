"""Block-sized copies that let the process's other threads run meanwhile.

A ``memoryview`` slice assignment holds the GIL for its whole memcpy, so in the kvstore a
2 MiB copy into a staging slot stalled gRPC's receiving thread, the event publisher and
every other RPC for its duration; numpy's copy and xxhash's update release it (measured
here: two threads copying 64 MiB take 2.1x one thread's time with slice assignment, 1.2x
with ``numpy.copyto``). The copy-and-hash variant works in cache-sized pieces and hashes
each piece where it landed while it is still in cache: one pass over memory instead of a
copy and a second read.

:func:`fresh_bytes` is where a copy must end in a ``bytes`` (what grpcio sends): a new,
uninitialized ``bytes`` (``PyBytes_FromStringAndSize(NULL, n)``, documented C API) with a
writable array over it, filled before anybody else sees it, instead of ``b"".join`` (a copy
under the GIL, and then a second pass to hash what it copied).
"""

from __future__ import annotations

import ctypes

import numpy as np
import xxhash

PIECE_BYTES = 256 << 10  # copy-then-hash granularity: stays in L2

_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.restype = ctypes.c_void_p
_bytes_address.argtypes = (ctypes.py_object,)


def _bytes(buffer) -> np.ndarray:
    return np.frombuffer(buffer, dtype=np.uint8)


def copy_into(dst, src) -> None:
    """``dst[:] = src`` for equal-length buffers, without holding the GIL."""
    np.copyto(_bytes(dst), _bytes(src))


def copy_hashed(src, dst, hasher: xxhash.xxh3_64 | None = None) -> int:
    """Copy ``src`` into ``dst`` (equal lengths) and hash what ``dst`` now holds; with
    ``hasher``, continue that running xxh3-64 (a block written in order, piece by piece).
    Returns the digest so far."""
    hasher = hasher if hasher is not None else xxhash.xxh3_64()
    source, target = _bytes(src), _bytes(dst)
    for start in range(0, len(source), PIECE_BYTES):
        piece = target[start : start + PIECE_BYTES]
        np.copyto(piece, source[start : start + PIECE_BYTES])
        hasher.update(piece)
    return hasher.intdigest()


def fresh_bytes(size: int) -> tuple[bytes, np.ndarray]:
    """A new ``bytes`` of ``size`` uninitialized bytes and a writable uint8 array over them.
    Fill the array completely before the ``bytes`` is hashed, compared or handed on (until
    then nothing else holds it), and keep the ``bytes`` alive while the array is used."""
    out = _new_bytes(None, size)
    address = _bytes_address(out)
    return out, np.frombuffer((ctypes.c_ubyte * size).from_address(address), dtype=np.uint8)
