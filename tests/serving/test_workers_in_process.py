"""The prefill and decode workers with their transport, follower and registry passed in: an
in-process kvstore (InProcessTransport over a TieredStore), the prefill worker followed
directly, an in-memory registry, so their logic (sequential and overlapped handoff) runs
without Redis, gRPC or shared memory."""

from __future__ import annotations

import threading
import time

import pytest

from pdserve.config import KVStoreSettings
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv.metadata import WorkerInfo
from pdserve.kv.transport import InProcessTransport
from pdserve.wire import KVSource
from services.decode.fetch import KVFetcher
from services.decode.follow import HandoffProgress
from services.decode.settings import DecodeSettings
from services.decode.worker import DecodeSpec, DecodeWorker
from services.engine_worker import OverloadedError
from services.kvstore.store import TieredStore
from services.prefill.settings import PrefillSettings
from services.prefill.worker import KVConnection, PrefillWorker
from tests.serving.conftest import BLOCK_BYTES, ENGINE_BLOCKS, EXACT, PASSAGE


class MemoryRegistry:
    """The WorkerRegistry calls a Heartbeat makes, kept in a dict."""

    def __init__(self) -> None:
        self.entries: dict[str, WorkerInfo] = {}

    def heartbeat(self, info: WorkerInfo) -> None:
        self.entries[info.worker_id] = info

    def deregister(self, worker_id: str) -> None:
        self.entries.pop(worker_id, None)


class DirectFollower:
    """PrefillFollower's interface over a prefill worker in this process."""

    def __init__(self, prefill: PrefillWorker) -> None:
        self.prefill = prefill

    def follow(self, address: str, request_id: str, *, wait_s: float, timeout_s: float):
        prefill = self.prefill

        class Stream:
            def __iter__(self):
                for keys, result, trace, _layers in prefill.follow(request_id, wait_s):
                    kv = KVSource(keys, address, "n")
                    first = result.first_token if result else None
                    cached = result.num_cached_tokens if result else None
                    yield HandoffProgress(kv, first, cached, trace)

            def cancel(self) -> None:
                pass  # the follow ends with the request; nothing to tear down in-process

        return Stream()

    def close(self) -> None:
        pass


COMMON = dict(
    node_id="n", redis_url="redis://127.0.0.1:1/0", grpc_port=0, http_port=0,
    kv_cache_bytes=ENGINE_BLOCKS * BLOCK_BYTES, heartbeat_interval_s=0.05, heartbeat_ttl_s=1.0,
    log_json=False, quantization=EXACT,
)  # fmt: skip


@pytest.fixture
def store():
    store = TieredStore(
        KVStoreSettings(
            node_id="n", block_size_bytes=BLOCK_BYTES, dram_capacity_bytes=64 * BLOCK_BYTES,
            staging_blocks=64, shm_enabled=False, redis_url="redis://127.0.0.1:1/0",
        )
    )  # fmt: skip
    yield store
    store.close()


@pytest.fixture
def workers(store, checkpoint):
    registry = MemoryRegistry()
    prefill = PrefillWorker(
        PrefillSettings(kvstore_address="in-process:0", **COMMON), checkpoint=checkpoint,
        worker_id="p-1", address="in-process:0",
        kv=KVConnection(lambda: InProcessTransport(store)), registry=registry,
    )  # fmt: skip
    fetcher = KVFetcher(
        "n", allow_shm=False, timeout_s=10, security=None,
        connect=lambda source: InProcessTransport(store),
    )  # fmt: skip
    decode = DecodeWorker(
        # Generous handoff waits: on a loaded machine the overlapped test's prefill may be
        # submitted, or a fetch may end, later than the defaults (5 s, 2 s), past which the
        # decode (rightly) recomputes alone and the exact-fetch assertions would not hold.
        DecodeSettings(
            hbm_publish_interval_s=0, handoff_wait_s=60, kv_fetch_timeout_s=60, **COMMON
        ),
        checkpoint=checkpoint,
        worker_id="d-1", address="in-process:1", fetcher=fetcher,
        follower=DirectFollower(prefill), registry=registry,
    )  # fmt: skip
    prefill.start()
    decode.start()
    yield prefill, decode, registry
    decode.stop()
    prefill.stop()
    assert registry.entries == {}


def decode_all(decode: DecodeWorker, spec: DecodeSpec) -> list:
    events, done = [], threading.Event()

    def sink(event) -> None:
        events.append(event)
        if event.is_last:
            done.set()

    decode.submit(spec, sink)
    assert done.wait(120)
    return events


@pytest.mark.parametrize("overlapped", [False, True])
def test_handoff_in_process(workers, oracle, overlapped):
    prefill, decode, registry = workers
    prompt = (oracle.tokenizer.encode(PASSAGE) * 3)[:70]
    prompt[0] = 4000 + overlapped
    params = SamplingParams(temperature=0.0, max_tokens=6)
    [expected] = oracle.generate([prompt], params)
    rid = f"h-{overlapped}"
    if overlapped:  # the decode first, following the prefill that starts after it
        spec = DecodeSpec(rid, prompt, params, prefill_address="in-process:0")
        events: list = []
        thread = threading.Thread(target=lambda: events.extend(decode_all(decode, spec)))
        thread.start()
        time.sleep(0.1)
        prefill.submit(prompt, params, request_id=rid).result(120)
        thread.join(120)
    else:
        result = prefill.submit(prompt, params, request_id=rid).result(120)
        spec = DecodeSpec(rid, prompt, params, first_token=result.first_token, kv=result.kv)
        events = decode_all(decode, spec)
    assert [t for e in events for t in e.token_ids] == expected.token_ids
    assert (events[0].num_kv_blocks_fetched, events[0].recomputed) == (4, False)
    assert {"p-1", "d-1"} <= set(registry.entries)


def test_prefill_worker_runs_on_an_in_process_store_without_redis(tmp_path, checkpoint, oracle):
    store = TieredStore(
        KVStoreSettings(
            node_id="n", block_size_bytes=BLOCK_BYTES, dram_capacity_bytes=64 * BLOCK_BYTES,
            staging_blocks=64, shm_enabled=False, redis_url="redis://127.0.0.1:1/0",
        )
    )  # fmt: skip
    registry = MemoryRegistry()
    settings = PrefillSettings(kvstore_address="in-process:0", **COMMON)
    worker = PrefillWorker(
        settings, checkpoint=checkpoint, worker_id="p-1", address="in-process:0",
        kv=KVConnection(lambda: InProcessTransport(store)), registry=registry,
    )  # fmt: skip
    worker.start()
    try:
        prompt = (oracle.tokenizer.encode(PASSAGE) * 3)[:70]
        result = worker.submit(prompt, SamplingParams(temperature=0.0), request_id="r").result(120)
        [expected] = oracle.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))
        assert result.first_token.token_id == expected.token_ids[0]
        keys = oracle.block_keys(prompt[:64])
        assert result.kv.block_keys == tuple(keys)
        assert store.lookup(keys).prefix_blocks == 4
        assert all(len(store.get(k)[0]) == BLOCK_BYTES for k in keys)
        events = list(worker.follow("r", wait_s=1.0))  # ended: the result at once
        assert [(len(k), r is result, t, g) for k, r, t, g in events] == [(4, True, {}, ())]
        deadline = time.monotonic() + 5
        while "p-1" not in registry.entries and time.monotonic() < deadline:
            time.sleep(0.01)
        assert registry.entries["p-1"].role == "prefill"
    finally:
        worker.stop()
    assert registry.entries == {}
    store.close()


def test_both_workers_share_the_job_table_and_registry_entry(store, checkpoint):
    """EngineWorker: one job table with the same limits, one registry entry shape, stop
    aborts what is left and deregisters; the engine thread is not started until ``start``."""
    registry = MemoryRegistry()
    limits = {**COMMON, "max_queued_requests": 1}
    prefill = PrefillWorker(
        PrefillSettings(kvstore_address="in-process:0", **limits), checkpoint=checkpoint,
        worker_id="p-1", address="in-process:0",
        kv=KVConnection(lambda: InProcessTransport(store)), registry=registry,
    )  # fmt: skip
    decode = DecodeWorker(
        DecodeSettings(hbm_publish_interval_s=0, **limits), checkpoint=checkpoint,
        worker_id="d-1", address="in-process:1",
        fetcher=KVFetcher("n", allow_shm=False, timeout_s=1, security=None),
        follower=DirectFollower(prefill), registry=registry,
    )  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=2)
    events: list = []
    decode.submit(DecodeSpec("a", [5] * 20, params), events.append)
    with pytest.raises(ValueError, match="already in use"):
        decode.submit(DecodeSpec("a", [5] * 20, params), events.append)
    with pytest.raises(OverloadedError, match="1 requests in progress"):
        decode.submit(DecodeSpec("b", [5] * 20, params), events.append)
    prefill.submit([5] * 20, params, request_id="a")
    with pytest.raises(OverloadedError, match="1 requests in progress"):
        prefill.submit([5] * 20, params, request_id="b")
    for worker, role, capacity in (
        (prefill, "prefill", {"num_blocks", "max_num_batched_tokens"}),
        (decode, "decode", {"num_blocks", "max_num_seqs"}),
    ):
        info = worker.worker_info()
        assert (info.worker_id, info.role, info.node_id) == (worker.worker_id, role, "n")
        assert set(info.capacity) == capacity and info.capacity["num_blocks"] == ENGINE_BLOCKS
        assert {"running", "waiting", "num_free_blocks", "step_ms"} <= set(info.load)
        # the router sizes a local prefill's chunks by the budget the worker reports
        assert info.load["max_num_batched_tokens"] == worker.settings.engine.max_num_batched_tokens
    decode.start()
    prefill.start()
    decode.stop()
    prefill.stop()
    assert registry.entries == {}
    [last] = [e for e in events if e.is_last]  # exactly one end, whichever came first
    assert last.finish_reason in ("abort", "length")


def test_a_failed_step_fails_its_requests_and_the_worker_serves_on(workers, oracle):
    _, decode, _ = workers
    prompt = (oracle.tokenizer.encode(PASSAGE) * 2)[:40]
    params = SamplingParams(temperature=0.0, max_tokens=4)
    real_step, failures = decode.engine.step, []

    def step_once_failing(**kwargs):
        if not failures:
            failures.append(1)
            raise RuntimeError("boom")
        return real_step(**kwargs)

    decode.engine.step = step_once_failing
    failed = decode_all(decode, DecodeSpec("f-1", prompt, params))
    assert failed[-1].error == "decode step failed: boom"
    served = decode_all(decode, DecodeSpec("f-2", prompt, params))
    [expected] = oracle.generate([prompt], params)
    assert [t for e in served for t in e.token_ids] == expected.token_ids
