"""One kvstore node: the store plus its control-plane duties (no gRPC here).

Lifecycle: ``start`` (publish the full inventory, start heartbeats and the lease sweeper)
→ serving → ``stop`` (refuse writes, report volatile blocks gone, flush events, deregister).
Redis being down never stops serving: events wait in a bounded buffer and the inventory is
republished when Redis answers again.
"""

from __future__ import annotations

import os
import threading
import time

import structlog

from pdserve import metrics
from pdserve.config import KVStoreSettings
from pdserve.kv.metadata import (
    Heartbeat,
    KVEventPublisher,
    RedisLayout,
    WorkerInfo,
    WorkerRegistry,
    connect_for,
)
from services.kvstore.store import TieredStore

log = structlog.get_logger(__name__)


class KVStoreNode:
    def __init__(self, settings: KVStoreSettings, *, address: str | None = None) -> None:
        self.settings = settings
        self.address = address or settings.address
        self._started_ms = int(time.time() * 1000)
        self.worker_id = f"kvstore-{settings.node_id}-{os.getpid()}-{settings.grpc_port}"
        self.store = TieredStore(settings)
        self.layout = RedisLayout(settings.cluster_name)
        self.redis = connect_for(settings)
        self.publisher = KVEventPublisher(
            self.redis,
            self.layout,
            settings.node_id,
            self.store.inventory,
            buffer_max=settings.event_buffer_max,
            stream_maxlen=settings.event_stream_maxlen,
        )
        self.store.set_event_sink(self.publisher.enqueue)
        registry = WorkerRegistry(self.redis, self.layout, settings.heartbeat_ttl_s)
        self.heartbeat = Heartbeat(registry, self.worker_info, settings.heartbeat_interval_s)
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="kv-sweeper", daemon=True)

    def worker_info(self) -> WorkerInfo:
        """Capacity and used share per tier; the counters behind the console's hit rate and
        evictions (``num_evicted_<tier>``: blocks pushed out of that tier, demoted or dropped)."""
        stats = self.store.stats()
        load = {t.tier.label: t.used_bytes / max(t.capacity_bytes, 1) for t in stats.tiers}
        load |= {f"num_evicted_{t.tier.label}": t.num_evicted for t in stats.tiers}
        load |= {"num_hits": stats.num_hits, "num_misses": stats.num_misses}
        return WorkerInfo(
            worker_id=self.worker_id,
            role="kvstore",
            address=self.address,
            node_id=self.settings.node_id,
            capacity={t.tier.label: t.capacity_bytes for t in stats.tiers},
            load=load,
            started_unix_ms=self._started_ms,
        )

    def start(self) -> None:
        self.publisher.start()
        self.heartbeat.start()
        self._sweeper.start()
        log.info(
            "kvstore.started", node=self.settings.node_id, tiers=[t.label for t in self.store.tiers]
        )

    def _sweep(self) -> None:
        self.publish_metrics()
        while not self._stop.wait(0.5):
            self.store.expire()
            self.publish_metrics()

    def publish_metrics(self) -> None:
        """Tier occupancy gauges from the store's stats (every sweep: 0.5 s)."""
        for t in self.store.stats().tiers:
            metrics.KV_TIER_USED_BYTES.labels(t.tier.label).set(t.used_bytes)
            metrics.KV_TIER_CAPACITY_BYTES.labels(t.tier.label).set(t.capacity_bytes)
            metrics.KV_TIER_BLOCKS.labels(t.tier.label).set(t.num_blocks)

    def stop(self) -> None:
        self._stop.set()
        self.store.close()
        flushed = self.publisher.flush(self.settings.shutdown_grace_s)
        self.publisher.stop(timeout_s=1.0)
        self.heartbeat.stop(deregister=True)
        self.redis.close()
        log.info("kvstore.stopped", node=self.settings.node_id, events_flushed=flushed)
