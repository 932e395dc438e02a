"""Publishing the decode engine's own cached blocks (tier ``hbm``) to the Redis location map.

The blocks are published under the *worker id* as their location node, not under the host's
node id: the kvstore on the same host already owns ``{c}:kv:blocks:{node_id}`` and its
epoch (a KVEventPublisher republish replaces the whole hash), so two publishers on one node
id would erase each other. The router maps a decode worker to its cache by that id
(``LocationIndex.longest_prefixes`` returns ``NodePrefix(node_id=<worker id>, ...)``).

The engine has no eviction callback, so the engine thread calls :meth:`sync` every
``interval_s`` with the keys now cached; the diff becomes ``stored`` / ``evicted`` events.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from pdserve.kv.blocks import BlockKey, Tier
from pdserve.kv.metadata import KVEventPublisher, LocationEvent, RedisLayout


class HbmPublisher:
    def __init__(self, client, layout: RedisLayout, location_node: str, interval_s: float) -> None:
        self._interval_s = interval_s
        self._lock = threading.Lock()  # the publisher thread reads the inventory
        self._blocks: dict[BlockKey, Tier] = {}
        self._seq = 0
        self._next_sync = 0.0
        self.publisher = KVEventPublisher(client, layout, location_node, self._inventory)

    def start(self) -> None:
        self.publisher.start()

    def stop(self) -> None:
        self.sync((), force=True)  # a stopped worker's cache is gone
        self.publisher.stop(timeout_s=1.0)

    def _inventory(self) -> tuple[int, dict[BlockKey, Tier]]:
        with self._lock:
            return self._seq, dict(self._blocks)

    def due(self) -> bool:
        return time.monotonic() >= self._next_sync

    def sync(self, keys: Iterable[bytes], *, force: bool = False) -> None:
        """Publish the difference between ``keys`` (cached now) and the last sync."""
        if not force and not self.due():
            return
        self._next_sync = time.monotonic() + self._interval_s
        now = {BlockKey(k) for k in keys}
        with self._lock:
            gone = [k for k in self._blocks if k not in now]
            new = [k for k in now if k not in self._blocks]
            for key in gone:
                del self._blocks[key]
                self._seq += 1
                self.publisher.enqueue(LocationEvent(self._seq, "evicted", key, None, Tier.HBM))
            for key in new:
                self._blocks[key] = Tier.HBM
                self._seq += 1
                self.publisher.enqueue(LocationEvent(self._seq, "stored", key, Tier.HBM, None))
