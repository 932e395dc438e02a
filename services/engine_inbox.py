"""The hand-off to a worker's engine thread (prefill and decode).

One thread drives the engine; every other thread (gRPC handlers, fetch pools) hands it
closures with ``call_soon``. Only the engine thread calls ``drain`` and ``wait``; the
closures run there, in the order they were queued.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class EngineInbox:
    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` for the engine thread and wake it (any thread)."""
        self._calls.put(fn)
        self._wake.set()

    def close(self) -> None:
        """Ask the engine thread's loop to end (any thread)."""
        self._closed.set()
        self._wake.set()

    def drain(self) -> None:
        """Run every queued call (engine thread)."""
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            fn()

    def wait(self, timeout_s: float) -> None:
        """Sleep until a call is queued, ``close``, or ``timeout_s`` (engine thread)."""
        self._wake.wait(timeout_s)
        self._wake.clear()
