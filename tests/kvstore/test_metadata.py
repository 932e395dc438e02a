"""The Redis control plane against a real redis-server: registry, events, index, outages."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import redis

from pdserve.kv.blocks import Tier
from pdserve.kv.errors import KVError
from pdserve.kv.metadata import (
    KVEventPublisher,
    LocationEvent,
    LocationIndex,
    RedisLayout,
    WorkerInfo,
    WorkerRegistry,
    connect,
)
from services.kvstore.node import KVStoreNode
from tests.conftest import RedisServer
from tests.kvstore.helpers import key, payload, settings


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def node(tmp_path, redis_url, cluster_name):
    node = KVStoreNode(
        settings(
            tmp_path, dram_blocks=3, ssd_blocks=3, redis_url=redis_url, cluster_name=cluster_name
        )
    )
    node.start()
    yield node
    node.stop()


def redis_blocks(client, layout: RedisLayout, node_id: str) -> dict:
    raw = client.hgetall(layout.node_blocks(node_id))
    return {bytes.fromhex(k.decode()): Tier[v.decode().upper()] for k, v in raw.items()}


def test_registry_heartbeat_ttl_and_deregister(redis_url, cluster_name):
    client = connect(redis_url)
    registry = WorkerRegistry(client, RedisLayout(cluster_name), ttl_s=0.3)
    registry.heartbeat(WorkerInfo("p1", "prefill", "h:1", "n1", {"dram": 10}, {"queue": 2.0}))
    registry.heartbeat(WorkerInfo("d1", "decode", "h:2", "n1"))
    assert [w.worker_id for w in registry.workers()] == ["d1", "p1"]
    (p1,) = registry.workers("prefill")
    assert (p1.address, p1.capacity, p1.load) == ("h:1", {"dram": 10}, {"queue": 2.0})
    registry.deregister("d1")
    assert [w.worker_id for w in registry.workers()] == ["p1"]
    time.sleep(0.4)  # no heartbeat: out of rotation
    assert registry.workers() == []


def test_node_registers_and_deregisters(node, redis_url, cluster_name):
    registry = WorkerRegistry(connect(redis_url), RedisLayout(cluster_name), ttl_s=10)
    wait_for(lambda: registry.workers("kvstore"), what="registration")
    (info,) = registry.workers("kvstore")
    assert (info.node_id, info.capacity) == ("node-a", {"dram": 3 * 4096, "ssd": 3 * 4096})
    node.stop()
    assert registry.workers() == []


def test_events_keep_redis_and_index_equal_to_store(node, redis_url, cluster_name):
    client, layout = connect(redis_url), RedisLayout(cluster_name)
    index = LocationIndex(client, layout)
    index.rebuild()
    for i in range(8):  # 3 DRAM + 3 SSD: two evictions, several demotions
        node.store.put(key(i), payload(i))
    node.store.get(key(3))  # promotion
    node.store.delete([key(7)])
    assert node.publisher.flush()
    _, inventory = node.store.inventory()
    assert redis_blocks(client, layout, "node-a") == inventory
    index.poll()
    assert index.node_blocks("node-a") == inventory
    events = stream_events(client, layout)
    ops = [op for _, op, _ in events]
    assert ops[0] == "resync" and {"stored", "demoted", "evicted", "promoted", "deleted"} <= set(
        ops
    )
    seqs = [seq for seq, _, _ in events][1:]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def stream_events(client, layout: RedisLayout) -> list[tuple[int, str, str]]:
    """(seq, op, key hex) of every event in the stream, entries unpacked (an entry of n
    events covers seq .. seq + n - 1)."""
    out = []
    for _, f in client.xrange(layout.events):
        ops, keys = f[b"op"].decode().split(","), f[b"key"].decode().split(",")
        first = int(f[b"seq"])
        out.extend((first + i, op, k) for i, (op, k) in enumerate(zip(ops, keys, strict=True)))
    return out


def test_a_batch_of_events_is_one_stream_entry_and_one_hash_write(redis_url, cluster_name):
    """500 events enqueued at once reach Redis as one entry, and each key's hash field holds
    its state after the batch (a block stored then deleted is absent)."""
    client, layout = connect(redis_url), RedisLayout(cluster_name)
    pub = KVEventPublisher(client, layout, "n1", lambda: (0, {}))
    pub.start()
    assert pub.flush()
    index = LocationIndex(client, layout)
    index.rebuild()
    for i in range(1, 499):
        pub.enqueue(LocationEvent(i, "stored", key(i), Tier.DRAM, None))
    pub.enqueue(LocationEvent(499, "deleted", key(1), None, Tier.DRAM))
    pub.enqueue(LocationEvent(500, "demoted", key(2), Tier.SSD, Tier.DRAM))
    assert pub.flush()
    entries = client.xrange(layout.events)
    assert len(entries) == 2  # the resync, then the batch
    assert stream_events(client, layout)[-1] == (500, "demoted", key(2).hex())
    expected = {key(i): Tier.DRAM for i in range(3, 499)} | {key(2): Tier.SSD}
    assert redis_blocks(client, layout, "n1") == expected
    index.poll()
    assert index.node_blocks("n1") == expected
    reloads = index.num_node_reloads
    pub.enqueue(LocationEvent(501, "stored", key(1), Tier.DRAM, None))
    assert pub.flush()
    index.poll()  # 501 follows the entry that covered 1..500: no gap, no reload
    assert index.num_node_reloads == reloads
    assert index.node_blocks("n1") == expected | {key(1): Tier.DRAM}
    pub.stop()


def test_a_seq_jump_inside_a_batch_starts_a_new_entry_and_the_reader_reloads(
    redis_url, cluster_name
):
    client, layout = connect(redis_url), RedisLayout(cluster_name)
    pub = KVEventPublisher(client, layout, "n1", lambda: (0, {}))
    pub.start()
    assert pub.flush()
    index = LocationIndex(client, layout)
    index.rebuild()
    pub.enqueue(LocationEvent(1, "stored", key(1), Tier.DRAM, None))
    assert pub.flush()
    index.poll()
    client.hset(layout.node_blocks("n1"), key(2).hex(), "ssd")  # event 2 was lost
    pub.enqueue(LocationEvent(3, "stored", key(3), Tier.DRAM, None))
    pub.enqueue(LocationEvent(4, "stored", key(4), Tier.DRAM, None))
    pub.enqueue(LocationEvent(6, "stored", key(6), Tier.DRAM, None))  # event 5 lost too
    assert pub.flush()
    assert [int(f[b"seq"]) for _, f in client.xrange(layout.events)][-2:] == [3, 6]
    reloads = index.num_node_reloads
    index.poll()
    assert index.num_node_reloads == reloads + 2
    assert index.node_blocks("n1") == redis_blocks(client, layout, "n1")


class GatedRedis:
    """A client whose pipelines wait at a gate (so a test can hold the publisher mid-drain)."""

    def __init__(self, client) -> None:
        self._client = client
        self.gate, self.waiting = threading.Event(), threading.Event()
        self.gate.set()

    def pipeline(self, **kwargs):
        if not self.gate.is_set():
            self.waiting.set()
            self.gate.wait()
        return self._client.pipeline(**kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_flush_waits_for_an_event_enqueued_while_the_publisher_goes_idle(redis_url, cluster_name):
    """An event that arrives between the publisher's empty-buffer check and its going idle
    is not flushed until it is in Redis."""
    client, layout = connect(redis_url), RedisLayout(cluster_name)
    gated = GatedRedis(client)
    pub = KVEventPublisher(gated, layout, "n1", lambda: (0, {}))
    armed = [True]

    class EnqueueAsIdleIsSet(threading.Event):
        def set(self) -> None:
            if armed[0]:
                armed[0] = False
                gated.gate.clear()  # hold the drain of the late event
                pub.enqueue(LocationEvent(1, "stored", key(1), Tier.DRAM, None))
            super().set()

    pub._idle = EnqueueAsIdleIsSet()
    pub.start()
    assert gated.waiting.wait(5)  # the publisher is draining the late event
    assert not pub.flush(0.3)  # ... so flush must not report it published
    gated.gate.set()
    assert pub.flush()
    assert redis_blocks(client, layout, "n1") == {key(1): Tier.DRAM}
    pub.stop()


class CountingRedis:
    """Counts the GETs a publisher sends outside its pipelines (its idle epoch checks)."""

    def __init__(self, client) -> None:
        self._client = client
        self.num_gets = 0

    def get(self, name):
        self.num_gets += 1
        return self._client.get(name)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_a_trickle_of_events_costs_no_epoch_check_per_drain(redis_url, cluster_name):
    """Each drain reads the epoch inside its MULTI; the idle check waits for a quiet
    interval (it used to follow every drain: two round trips per event of a Put stream)."""
    client, layout = connect(redis_url), RedisLayout(cluster_name)
    counting = CountingRedis(client)
    pub = KVEventPublisher(counting, layout, "n1", lambda: (0, {}), check_interval_s=30)
    pub.start()
    assert pub.flush()
    for i in range(1, 11):
        pub.enqueue(LocationEvent(i, "stored", key(i), Tier.DRAM, None))
        assert pub.flush()
    assert counting.num_gets == 0
    assert len(redis_blocks(client, layout, "n1")) == 10
    pub.stop()


def test_events_arriving_within_the_linger_go_out_as_one_entry(redis_url, cluster_name):
    client, layout = connect(redis_url), RedisLayout(cluster_name)
    pub = KVEventPublisher(client, layout, "n1", lambda: (0, {}), linger_s=0.3)
    pub.start()
    assert pub.flush()
    pub.enqueue(LocationEvent(1, "stored", key(1), Tier.DRAM, None))
    time.sleep(0.05)  # the publisher is awake and waiting for more
    pub.enqueue(LocationEvent(2, "stored", key(2), Tier.DRAM, None))
    assert pub.flush()
    assert [(seq, op) for seq, op, _ in stream_events(client, layout)][1:] == [
        (1, "stored"),
        (2, "stored"),
    ]
    assert len(client.xrange(layout.events)) == 2  # the resync, then one entry of both
    pub.stop()


def test_longest_prefix_per_node_per_tier(redis_url, cluster_name):
    client, layout = connect(redis_url), RedisLayout(cluster_name)
    inventories = {
        "n1": {key(0): Tier.DRAM, key(1): Tier.DRAM, key(2): Tier.SSD, key(4): Tier.DRAM},
        "n2": {key(0): Tier.SSD},
        "n3": {key(1): Tier.DRAM},
    }
    publishers = []
    for node_id, blocks in inventories.items():
        pub = KVEventPublisher(client, layout, node_id, lambda b=blocks: (0, b))
        pub.start()
        publishers.append(pub)
    for pub in publishers:
        assert pub.flush()
    index = LocationIndex(client, layout)
    index.rebuild()
    n1, n2 = index.longest_prefixes([key(i) for i in range(5)])
    assert (n1.node_id, n1.num_blocks, n2.node_id, n2.num_blocks) == ("n1", 3, "n2", 1)
    assert n1.within_tier == {Tier.HBM: 0, Tier.DRAM: 2, Tier.SSD: 3}
    assert n1.num_blocks_by_tier == {Tier.DRAM: 2, Tier.SSD: 1}
    assert n2.within_tier == {Tier.HBM: 0, Tier.DRAM: 0, Tier.SSD: 1}
    # Live events move the answer: n2 gains block 1 in DRAM.
    publishers[1].enqueue(LocationEvent(1, "stored", key(1), Tier.DRAM, None))
    assert publishers[1].flush()
    index.poll()
    assert [(p.node_id, p.num_blocks) for p in index.longest_prefixes([key(0), key(1)])] == [
        ("n1", 2),
        ("n2", 2),
    ]
    assert index.locations(key(1)) == {"n1": Tier.DRAM, "n2": Tier.DRAM, "n3": Tier.DRAM}
    for pub in publishers:
        pub.stop()


def test_seq_gap_reloads_the_node(redis_url, cluster_name):
    client, layout = connect(redis_url), RedisLayout(cluster_name)
    blocks: dict = {}
    pub = KVEventPublisher(client, layout, "n1", lambda: (0, dict(blocks)))
    pub.start()
    assert pub.flush()
    index = LocationIndex(client, layout)
    index.rebuild()
    pub.enqueue(LocationEvent(1, "stored", key(1), Tier.DRAM, None))
    assert pub.flush()
    index.poll()
    # Event 2 never reaches the stream (written to the hash by hand, as a lost event would be).
    client.hset(layout.node_blocks("n1"), key(2).hex(), "ssd")
    pub.enqueue(LocationEvent(3, "stored", key(3), Tier.DRAM, None))
    assert pub.flush()
    reloads = index.num_node_reloads
    index.poll()
    assert index.num_node_reloads == reloads + 1
    assert index.node_blocks("n1") == {key(1): Tier.DRAM, key(2): Tier.SSD, key(3): Tier.DRAM}
    pub.stop()


def test_buffer_overflow_republishes_inventory(tmp_path, redis_url, cluster_name):
    node = KVStoreNode(
        settings(tmp_path, dram_blocks=4, redis_url=redis_url, cluster_name=cluster_name)
    )
    node.publisher = KVEventPublisher(
        node.redis, node.layout, "node-a", node.store.inventory, buffer_max=2
    )
    node.store.set_event_sink(node.publisher.enqueue)
    for i in range(6):  # before the publisher runs: the buffer overflows
        node.store.put(key(i), payload(i))
    node.start()
    assert node.publisher.flush()
    _, inventory = node.store.inventory()
    assert redis_blocks(node.redis, node.layout, "node-a") == inventory
    node.stop()


def test_password_url(tmp_path):
    server = RedisServer(tmp_path, password="s3cret")
    server.start()
    try:
        assert connect(server.url).ping()
        with pytest.raises(redis.AuthenticationError):
            connect(server.url.replace("s3cret", "wrong")).ping()
    finally:
        server.stop()


def test_rediss_url_uses_tls():
    client = connect(
        "rediss://:pw@example.invalid:6380/0", ca_file="/etc/ssl/certs/ca-certificates.crt"
    )
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert (kwargs["password"], kwargs["ssl_ca_certs"]) == (
        "pw",
        "/etc/ssl/certs/ca-certificates.crt",
    )


def test_redis_restart_mid_run_converges(tmp_path, redis_server, cluster_name):
    node = KVStoreNode(
        settings(
            tmp_path,
            dram_blocks=4,
            ssd_blocks=4,
            redis_url=redis_server.url,
            cluster_name=cluster_name,
        )
    )
    node.start()
    index = LocationIndex(connect(redis_server.url), RedisLayout(cluster_name), poll_block_ms=50)
    index.start()
    stop = threading.Event()

    def writer() -> None:  # the store keeps serving through the outage
        i = 0
        while not stop.is_set():
            node.store.put(key(1000 + i), payload(i))
            assert node.store.get(key(1000 + i)) is not None
            i += 1
            time.sleep(0.005)

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.3)
    redis_server.restart(down_s=0.5)  # comes back empty
    time.sleep(0.3)
    stop.set()
    thread.join()
    assert node.publisher.flush(10)
    inventory = node.store.inventory()[1]
    wait_for(lambda: redis_blocks(node.redis, node.layout, "node-a") == inventory, what="redis")
    wait_for(lambda: index.node_blocks("node-a") == inventory, what="index")
    assert node.publisher.num_republished >= 2
    index.stop()
    node.stop()


def test_concurrent_writers_redis_equals_store(node, redis_url, cluster_name):
    index = LocationIndex(connect(redis_url), RedisLayout(cluster_name), poll_block_ms=50)
    index.start()

    def work(worker: int) -> None:
        for n in range(40):
            i = (worker * 5 + n) % 10
            with contextlib.suppress(KVError):  # duplicates, contention: consistency is the point
                node.store.put(key(i), payload(i))
            node.store.get(key((i + 3) % 10))
            if n % 7 == 0:
                node.store.delete([key(i)])

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert node.publisher.flush()
    inventory = node.store.inventory()[1]
    assert redis_blocks(node.redis, node.layout, "node-a") == inventory
    wait_for(lambda: index.node_blocks("node-a") == inventory, what="index")
    index.stop()


def test_an_idle_publisher_republishes_within_a_heartbeat_of_a_redis_restart(
    tmp_path, redis_server, cluster_name
):
    """No event to publish, no failed write: only the epoch check can notice the restart."""
    client, layout = connect(redis_server.url), RedisLayout(cluster_name)
    blocks = {key(1): Tier.DRAM, key(2): Tier.SSD}
    pub = KVEventPublisher(client, layout, "idle", lambda: (0, dict(blocks)),
                           check_interval_s=0.2)  # fmt: skip
    pub.start()
    assert pub.flush()
    index = LocationIndex(connect(redis_server.url), layout, poll_block_ms=50)
    index.start()
    wait_for(lambda: index.node_blocks("idle") == blocks, what="index before")
    redis_server.restart(down_s=0.1)  # comes back empty, faster than a failed write
    started = time.monotonic()
    wait_for(lambda: redis_blocks(client, layout, "idle") == blocks, what="republish")
    assert time.monotonic() - started < 2.0
    wait_for(lambda: index.node_blocks("idle") == blocks, what="index after")
    assert pub.num_republished == 2
    index.stop()
    pub.stop()
