"""glibc malloc settings for a process that moves KV blocks over gRPC.

Every gRPC message a process receives becomes a new Python ``bytes``. A KV block (2 MiB for
Llama-3-8B in bf16) is above glibc's mmap threshold, so by default each message is a fresh
mapping whose pages fault in, zeroed, while the message is copied into it, and are unmapped
again when it is freed: a quarter of a gRPC reader's CPU time in a profile of
``benchmarks/kv_transfer.py``. Serving such buffers from the heap, and keeping freed heap
for the next message instead of trimming it, removes those faults. The services call
:func:`keep_large_buffers` once at start-up, before any traffic.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


def keep_large_buffers(
    *, mmap_threshold_bytes: int = 32 << 20, trim_threshold_bytes: int = 64 << 20
) -> bool:
    """Allocations below ``mmap_threshold_bytes`` come from the heap, and up to
    ``trim_threshold_bytes`` of free heap is kept at the top of each malloc arena (the cost:
    that much resident memory an arena may hold on to; 64 MiB is some 30 blocks in flight).
    False where the C library is not glibc (nothing changes there)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # no glibc (musl, macOS): its own allocator stays
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(
        mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes)
        and mallopt(_M_TRIM_THRESHOLD, trim_threshold_bytes)
    )
