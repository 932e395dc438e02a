"""What the router remembers about where it sent prompts (cache-aware routing without RPCs).

A decode worker keeps the KV blocks of the prompts it served in its prefix cache, so the
router records, per block key, the decode workers it routed that block to. This is an
approximation (the worker may have evicted a block since), which is why it only steers the
score and never decides correctness. Bounded: least-recently-routed keys are forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pdserve.engine.block_hash import BlockKey


class PrefixAffinity:
    """Block key -> decode worker ids, LRU-bounded at ``capacity_blocks`` keys."""

    def __init__(self, capacity_blocks: int) -> None:
        self._capacity = capacity_blocks
        self._workers: OrderedDict[BlockKey, set[str]] = OrderedDict()

    def record(self, worker_id: str, keys: Sequence[BlockKey]) -> None:
        if self._capacity == 0:
            return
        for key in keys:
            holders = self._workers.get(key)
            if holders is None:
                holders = self._workers[key] = set()
            else:
                self._workers.move_to_end(key)
            holders.add(worker_id)
        while len(self._workers) > self._capacity:
            self._workers.popitem(last=False)

    def forget(self, worker_id: str, keys: Sequence[BlockKey]) -> None:
        """``worker_id`` never got ``keys`` (the call was cancelled before it ran)."""
        for key in keys:
            holders = self._workers.get(key)
            if holders is not None:
                holders.discard(worker_id)

    def forget_worker(self, worker_id: str) -> None:
        for holders in self._workers.values():
            holders.discard(worker_id)

    def prefix_blocks(self, worker_id: str, keys: Sequence[BlockKey]) -> int:
        """Length of the longest prefix of ``keys`` routed to ``worker_id``."""
        num = 0
        for key in keys:
            holders = self._workers.get(key)
            if holders is None or worker_id not in holders:
                break
            num += 1
        return num

    def __len__(self) -> int:
        return len(self._workers)
