"""The control plane in Redis: this module owns every key pdserve writes there.

Layout (``{c}`` = cluster name, default ``pdserve``):

===============================  ======  ==================================================
key                              type    contents
===============================  ======  ==================================================
``{c}:worker:{worker_id}``       hash    role, address, node_id, capacity (JSON), load
                                         (JSON), started_unix_ms, heartbeat_unix_ms; PEXPIRE
                                         heartbeat TTL, refreshed by every heartbeat
``{c}:workers``                  zset    worker_id scored by the unix ms its entry expires
``{c}:kv:nodes``                 set     node ids that publish block locations
``{c}:kv:blocks:{node_id}``      hash    block key (32 hex) -> tier (hbm|dram|ssd) held there
``{c}:kv:epoch:{node_id}``       string  the epoch (one per kvstore process) that last
                                         published the node's full inventory
``{c}:kv:events``                stream  node, epoch, seq, op, key, tier, from; MAXLEN ~
===============================  ======  ==================================================

Events: ``op`` is stored | promoted | demoted | evicted | deleted (``tier`` = where the
block is now, empty when gone; ``from`` = where it was), or ``resync`` after a full
republish (``key`` empty). ``seq`` increases by one per event of a node's epoch, so a
reader that sees a jump knows it missed events and reloads that node's hash. Events state
absolute facts, so replaying one twice is harmless.

One stream entry carries a batch: ``op``, ``key``, ``tier`` and ``from`` are
comma-separated lists with one item per event, and ``seq`` is the first event's, so an
entry of ``n`` events covers ``seq`` .. ``seq + n - 1`` (an entry of one event reads as a
single event). A batch's hash changes (one HSET, one HDEL: each key's state after the
batch) go in the same MULTI as its entry. One Redis command per event cost the kvstore
more of its time than the puts themselves (two thirds of its GIL samples under a
shared-memory put load).

Redis down: the store keeps serving; the publisher keeps at most ``buffer_max`` events and,
once Redis answers again, republishes the node's whole inventory (Redis may have restarted
empty) and then goes on streaming. An idle publisher checks its epoch key every
``check_interval_s`` (a heartbeat), so a Redis restart that happened while the node had
nothing to publish is noticed within one heartbeat, and the inventory republished.
"""

from __future__ import annotations

import collections
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis
import structlog

from pdserve import metrics
from pdserve.kv.blocks import BlockKey, Tier

if TYPE_CHECKING:
    from pdserve.config import ServiceSettings

log = structlog.get_logger(__name__)

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
_TIER_BY_LABEL = {t.label: t for t in Tier}


def connect(
    url: str,
    *,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    timeout_s: float = 2.0,
) -> redis.Redis:
    """A client for ``redis://[:password@]host:port/db`` or ``rediss://`` (TLS; a private CA
    and a client certificate when given)."""
    kwargs: dict = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    if url.startswith("rediss://"):
        if ca_file:
            kwargs["ssl_ca_certs"] = ca_file
        if cert_file and key_file:
            kwargs.update(ssl_certfile=cert_file, ssl_keyfile=key_file)
    return redis.Redis.from_url(url, **kwargs)


def connect_for(settings: ServiceSettings, **kwargs) -> redis.Redis:
    """The Redis client of a service: its URL (credentials included) and TLS files."""

    def path(p) -> str | None:
        return str(p) if p is not None else None

    return connect(
        settings.redis_url,
        ca_file=path(settings.redis_ca_file),
        cert_file=path(settings.redis_cert_file),
        key_file=path(settings.redis_key_file),
        **kwargs,
    )


@dataclass(frozen=True)
class RedisLayout:
    cluster: str = "pdserve"

    def worker(self, worker_id: str) -> str:
        return f"{self.cluster}:worker:{worker_id}"

    @property
    def workers(self) -> str:
        return f"{self.cluster}:workers"

    @property
    def nodes(self) -> str:
        return f"{self.cluster}:kv:nodes"

    def node_blocks(self, node_id: str) -> str:
        return f"{self.cluster}:kv:blocks:{node_id}"

    def node_epoch(self, node_id: str) -> str:
        return f"{self.cluster}:kv:epoch:{node_id}"

    @property
    def events(self) -> str:
        return f"{self.cluster}:kv:events"


# ---- worker registry ----


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: str  # router | prefill | decode | kvstore
    address: str
    node_id: str
    capacity: Mapping[str, int] = field(default_factory=dict)
    load: Mapping[str, float] = field(default_factory=dict)
    started_unix_ms: int = 0
    heartbeat_unix_ms: int = 0


class WorkerRegistry:
    """Workers announce themselves with a heartbeat; one whose key expires is out."""

    def __init__(self, client: redis.Redis, layout: RedisLayout, ttl_s: float) -> None:
        self._redis = client
        self._layout = layout
        self._ttl_ms = int(ttl_s * 1000)

    def heartbeat(self, info: WorkerInfo) -> None:
        now_ms = int(time.time() * 1000)
        key = self._layout.worker(info.worker_id)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "role": info.role,
                    "address": info.address,
                    "node_id": info.node_id,
                    "capacity": json.dumps(dict(info.capacity)),
                    "load": json.dumps(dict(info.load)),
                    "started_unix_ms": info.started_unix_ms or now_ms,
                    "heartbeat_unix_ms": now_ms,
                },
            )
            pipe.pexpire(key, self._ttl_ms)
            pipe.zadd(self._layout.workers, {info.worker_id: now_ms + self._ttl_ms})
            pipe.execute()

    def deregister(self, worker_id: str) -> None:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._layout.worker(worker_id))
            pipe.zrem(self._layout.workers, worker_id)
            pipe.execute()

    def workers(self, role: str | None = None) -> list[WorkerInfo]:
        """Live workers (optionally of one role), sorted by id."""
        now_ms = int(time.time() * 1000)
        self._redis.zremrangebyscore(self._layout.workers, "-inf", now_ms)
        ids = sorted(
            w.decode() for w in self._redis.zrangebyscore(self._layout.workers, now_ms, "+inf")
        )
        with self._redis.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.hgetall(self._layout.worker(worker_id))
            rows = pipe.execute()
        out = []
        for worker_id, row in zip(ids, rows, strict=True):
            if not row:
                continue
            f = {k.decode(): v.decode() for k, v in row.items()}
            info = WorkerInfo(
                worker_id=worker_id,
                role=f["role"],
                address=f["address"],
                node_id=f["node_id"],
                capacity=json.loads(f["capacity"]),
                load=json.loads(f["load"]),
                started_unix_ms=int(f["started_unix_ms"]),
                heartbeat_unix_ms=int(f["heartbeat_unix_ms"]),
            )
            if role is None or info.role == role:
                out.append(info)
        return out


class Heartbeat:
    """Refreshes one worker's registry entry every ``interval_s`` on a daemon thread."""

    def __init__(
        self, registry: WorkerRegistry, info: Callable[[], WorkerInfo], interval_s: float
    ) -> None:
        self._registry = registry
        self._info = info
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.worker_id = info().worker_id

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._registry.heartbeat(self._info())
            except REDIS_ERRORS:
                metrics.REDIS_ERRORS.labels("heartbeat").inc()
            self._stop.wait(self._interval_s)

    def stop(self, *, deregister: bool = True) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if deregister:
            try:
                self._registry.deregister(self.worker_id)
            except REDIS_ERRORS:
                metrics.REDIS_ERRORS.labels("deregister").inc()


# ---- KV events: the publishing side ----


@dataclass(frozen=True, slots=True)
class LocationEvent:
    """What the publisher needs of a store event (services.kvstore.store.KVEvent fits)."""

    seq: int
    op: str
    key: BlockKey
    tier: Tier | None
    from_tier: Tier | None


Inventory = Callable[[], tuple[int, Mapping[BlockKey, Tier]]]


class KVEventPublisher:
    """Streams one node's KV events to Redis; republishes its inventory after an outage.

    ``enqueue`` is O(1) and never touches the network (the store calls it under its lock);
    a daemon thread writes batches. ``inventory`` returns (last seq, key -> tier) atomically
    with respect to the events, so events at or before that seq are dropped after a
    republish and the stream stays gap-free per epoch.
    """

    def __init__(
        self,
        client: redis.Redis,
        layout: RedisLayout,
        node_id: str,
        inventory: Inventory,
        *,
        buffer_max: int = 100_000,
        stream_maxlen: int = 1_000_000,
        batch_size: int = 512,
        retry_s: float = 0.2,
        check_interval_s: float = 1.0,
        linger_s: float = 0.01,
    ) -> None:
        """``linger_s``: how long a woken publisher waits for more events before it writes,
        so that a steady trickle (a Put stream seals one block at a time) goes out in batches
        rather than one MULTI per block; the location index lags by that much more."""
        self._redis = client
        self._layout = layout
        self.node_id = node_id
        self._inventory = inventory
        self._buffer: collections.deque = collections.deque()
        self._buffer_max = buffer_max
        self._stream_maxlen = stream_maxlen
        self._batch_size = batch_size
        self._retry_s = retry_s
        self._check_interval_s = check_interval_s
        self._linger_s = linger_s
        self._epoch_seen_at = 0.0  # monotonic time Redis last showed our epoch
        self.epoch = uuid.uuid4().hex[:12]
        self._needs_republish = True
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self.connected = False
        self.num_republished = 0

    def enqueue(self, event: LocationEvent) -> None:
        if len(self._buffer) >= self._buffer_max:
            self._buffer.clear()  # overflow: the inventory will be republished instead
            self._needs_republish = True
        self._buffer.append(event)
        # Each Event call takes a lock; the store calls this under its own, once per event.
        if self._idle.is_set():
            self._idle.clear()
        if not self._wake.is_set():
            self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything enqueued so far is in Redis; False on timeout."""
        self._wake.set()
        return self._idle.wait(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self.flush(timeout_s)
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._needs_republish:
                    self._republish()
                if 0 < len(self._buffer) < self._batch_size:
                    self._stop.wait(self._linger_s)
                self._drain()
                # Each drain reads the epoch too: an idle check is due only after a quiet
                # interval (it had cost a round trip per drain of a trickle of events).
                stale = time.monotonic() - self._epoch_seen_at >= self._check_interval_s
                if not self._buffer and not self._wake.is_set() and stale:
                    self._check_epoch()
                self.connected = True
            except REDIS_ERRORS as exc:
                metrics.REDIS_ERRORS.labels("publish").inc()
                if self.connected:
                    log.warning("kv_events.redis_down", error=str(exc))
                self.connected = False
                self._needs_republish = True  # Redis may come back empty
                self._stop.wait(self._retry_s)
                continue
            if not self._buffer and not self._needs_republish:
                self._idle.set()
                if self._buffer:  # enqueued after the check, before idle was set
                    self._idle.clear()
                    continue
                self._wake.wait(self._check_interval_s)
                self._wake.clear()

    def _check_epoch(self) -> None:
        """Idle: is our inventory still in Redis? (A restart or a flush loses it.)"""
        epoch = self._redis.get(self._layout.node_epoch(self.node_id))
        if epoch is None or epoch.decode() != self.epoch:
            log.info("kv_events.inventory_lost", node=self.node_id)
            self._needs_republish = True
        else:
            self._epoch_seen_at = time.monotonic()

    def _republish(self) -> None:
        seq, blocks = self._inventory()
        L, node = self._layout, self.node_id
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(L.node_blocks(node))
            items = [(k.hex(), t.label) for k, t in blocks.items()]
            for start in range(0, len(items), 10_000):
                pipe.hset(L.node_blocks(node), mapping=dict(items[start : start + 10_000]))
            pipe.sadd(L.nodes, node)
            pipe.set(L.node_epoch(node), self.epoch)
            pipe.xadd(
                L.events,
                self._fields(seq, "resync", ()),
                maxlen=self._stream_maxlen,
                approximate=True,
            )
            pipe.execute()
        while self._buffer and self._buffer[0].seq <= seq:
            self._buffer.popleft()
        self._needs_republish = False
        self._epoch_seen_at = time.monotonic()
        self.num_republished += 1
        log.info("kv_events.republished", node=node, num_blocks=len(blocks), seq=seq)

    def _drain(self) -> None:
        L, node = self._layout, self.node_id
        while self._buffer and not self._needs_republish:
            batch = list(itertools.islice(self._buffer, self._batch_size))
            stored, gone = _final_states(batch)
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(L.node_epoch(node))
                if stored:
                    pipe.hset(L.node_blocks(node), mapping=stored)
                if gone:
                    pipe.hdel(L.node_blocks(node), *gone)
                for entry in _entries(batch):
                    fields = self._fields(entry[0].seq, ",".join(e.op for e in entry), entry)
                    pipe.xadd(L.events, fields, maxlen=self._stream_maxlen, approximate=True)
                results = pipe.execute()
            for _ in batch:
                self._buffer.popleft()
            if results[0] is None or results[0].decode() != self.epoch:
                self._needs_republish = True  # Redis lost our inventory (restart, flush)
                return
            self._epoch_seen_at = time.monotonic()

    def _fields(self, seq: int, op: str, events: Sequence[LocationEvent]) -> dict:
        return {
            "node": self.node_id,
            "epoch": self.epoch,
            "seq": seq,
            "op": op,
            "key": ",".join(e.key.hex() for e in events),
            "tier": ",".join(e.tier.label if e.tier else "" for e in events),
            "from": ",".join(e.from_tier.label if e.from_tier else "" for e in events),
        }


def _entries(batch: Sequence[LocationEvent]) -> list[list[LocationEvent]]:
    """The batch in runs of consecutive seqs, one stream entry each (a run's seqs are implied
    by its first, so a jump, e.g. events dropped on overflow, starts a new entry)."""
    runs = [[batch[0]]]
    for event in batch[1:]:
        if event.seq == runs[-1][-1].seq + 1:
            runs[-1].append(event)
        else:
            runs.append([event])
    return runs


def _final_states(batch: Sequence[LocationEvent]) -> tuple[dict[str, str], list[str]]:
    """(key hex -> tier label, keys gone) once every event of the batch has happened."""
    final = {e.key.hex(): e.tier.label if e.tier else "" for e in batch}
    stored = {k: tier for k, tier in final.items() if tier}
    return stored, [k for k, tier in final.items() if not tier]


# ---- the location index: the reading side ----


@dataclass(frozen=True)
class NodePrefix:
    """How much of a prompt's block chain one node holds.

    ``num_blocks``: length of the longest prefix held in any tier. ``within_tier[t]``:
    length of the longest prefix held entirely in tier ``t`` or faster (so
    ``within_tier[Tier.SSD] == num_blocks``). ``num_blocks_by_tier``: how the
    ``num_blocks`` prefix splits across tiers.
    """

    node_id: str
    num_blocks: int
    within_tier: Mapping[Tier, int]
    num_blocks_by_tier: Mapping[Tier, int]


class LocationIndex:
    """In-memory copy of every node's block locations, fed by the event stream.

    Reads (``longest_prefixes``, ``locations``) take no lock: per-node dicts are swapped or
    updated one assignment at a time. ``rebuild`` reloads from the hashes (at start, after
    Redis was unreachable); a seq jump in one node's events reloads just that node.
    """

    def __init__(
        self, client: redis.Redis, layout: RedisLayout, *, poll_block_ms: int = 200
    ) -> None:
        self._redis = client
        self._layout = layout
        self._poll_block_ms = poll_block_ms
        self._nodes: dict[str, dict[BlockKey, Tier]] = {}
        self._seq: dict[str, tuple[str, int]] = {}
        self._last_id = b"0-0"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.num_rebuilds = 0
        self.num_node_reloads = 0
        self.healthy = False

    # -- queries --

    def longest_prefixes(self, keys: Sequence[BlockKey]) -> list[NodePrefix]:
        """Every node holding a non-empty prefix of ``keys``, longest first."""
        out = []
        for node, blocks in list(self._nodes.items()):
            counts = [0, 0, 0, 0]  # by the slowest tier seen so far (index = Tier value)
            by_tier = [0, 0, 0, 0]
            slowest = 0
            get = blocks.get
            for key in keys:
                tier = get(key)
                if tier is None:
                    break
                slowest = max(slowest, tier)
                counts[slowest] += 1
                by_tier[tier] += 1
            total = sum(counts)
            if total:
                within, running = {}, 0
                for t in Tier:
                    running += counts[t]
                    within[t] = running
                split = {t: by_tier[t] for t in Tier if by_tier[t]}
                out.append(NodePrefix(node, total, within, split))
        out.sort(key=lambda p: (-p.num_blocks, p.node_id))
        return out

    def locations(self, key: BlockKey) -> dict[str, Tier]:
        return {node: blocks[key] for node, blocks in list(self._nodes.items()) if key in blocks}

    def node_blocks(self, node_id: str) -> dict[BlockKey, Tier]:
        return dict(self._nodes.get(node_id, {}))

    @property
    def num_blocks(self) -> int:
        return sum(len(b) for b in list(self._nodes.values()))

    # -- feeding --

    def rebuild(self) -> None:
        """Reload every node's hash and continue the stream from the snapshot's position."""
        L = self._layout
        nodes = sorted(n.decode() for n in self._redis.smembers(L.nodes))
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.xrevrange(L.events, count=1)
            for node in nodes:
                pipe.hgetall(L.node_blocks(node))
            last, *hashes = pipe.execute()
        self._nodes = {node: _parse_blocks(h) for node, h in zip(nodes, hashes, strict=True)}
        self._seq = {}
        self._last_id = last[0][0] if last else b"0-0"
        self.num_rebuilds += 1

    def _reload_node(self, node: str) -> None:
        self._nodes[node] = _parse_blocks(self._redis.hgetall(self._layout.node_blocks(node)))
        self.num_node_reloads += 1

    def poll(self, block_ms: int | None = None) -> int:
        """Apply new events (waiting up to ``block_ms``); returns how many."""
        reply = self._redis.xread(
            {self._layout.events: self._last_id}, count=10_000, block=block_ms
        )
        num = 0
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self._apply({k.decode(): v.decode() for k, v in fields.items()})
                self._last_id = entry_id
                num += 1
        return num

    def _apply(self, f: dict[str, str]) -> None:
        node, epoch, seq = f["node"], f["epoch"], int(f["seq"])
        if f["op"] == "resync":
            self._reload_node(node)
            self._seq[node] = (epoch, seq)
            return
        keys, tiers = f["key"].split(","), f["tier"].split(",")
        last = self._seq.get(node)
        self._seq[node] = (epoch, seq + len(keys) - 1)
        if last is not None and (last[0] != epoch or seq > last[1] + 1):
            log.info("location_index.gap", node=node, expected=last[1] + 1, got=seq)
            self._reload_node(node)  # the hash already holds these events' effect
            return
        blocks = self._nodes.setdefault(node, {})
        for key_hex, tier in zip(keys, tiers, strict=True):
            key = BlockKey(bytes.fromhex(key_hex))
            if tier:
                blocks[key] = _TIER_BY_LABEL[tier]
            else:
                blocks.pop(key, None)

    def start(self) -> None:
        """Tail the stream on a daemon thread (rebuilding first and after every outage)."""
        self._thread = threading.Thread(target=self._run, name="location-index", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        needs_rebuild = True
        while not self._stop.is_set():
            try:
                if needs_rebuild:
                    self.rebuild()
                    needs_rebuild = False
                self.poll(self._poll_block_ms)
                self.healthy = True
            except REDIS_ERRORS as exc:
                metrics.REDIS_ERRORS.labels("stream").inc()
                if self.healthy:
                    log.warning("location_index.redis_down", error=str(exc))
                self.healthy = False
                needs_rebuild = True
                self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _parse_blocks(raw: Mapping[bytes, bytes]) -> dict[BlockKey, Tier]:
    return {BlockKey(bytes.fromhex(k.decode())): _TIER_BY_LABEL[v.decode()] for k, v in raw.items()}
