"""The decode worker over real gRPC, fed by a real prefill worker through a real kvstore:
token-for-token equality with the offline engine, KV fetch failure → local recompute,
cancellation frees blocks, bad input, load and HBM publishing in Redis."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from pdserve._proto.pdserve.v1 import common_pb2, decode_pb2, prefill_pb2
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv.metadata import LocationIndex, RedisLayout, WorkerRegistry, connect
from tests.conftest import free_port
from tests.serving.conftest import PASSAGE

MAX_TOKENS = 8


def greedy(max_tokens: int = MAX_TOKENS, **kwargs) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def offline(oracle, prompt: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    [done] = oracle.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return done.token_ids


def prefill_then_decode(
    prefill_stub, decode_stub, prompt, *, rid, kv_address=None, **decode_kwargs
):
    """The disaggregated path as the router drives it; returns (prefill response, chunks)."""
    sampling = greedy()
    p = prefill_stub.Prefill(
        prefill_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling),
        timeout=120,
    )
    kv = common_pb2.KVSource()
    kv.CopyFrom(p.kv)
    if kv_address is not None:
        kv.kvstore_address = kv_address
    request = decode_pb2.DecodeRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=sampling, first_token_id=p.first_token_id,
        kv=kv, **decode_kwargs,
    )  # fmt: skip
    return p, list(decode_stub.Decode(request, timeout=120))


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


@pytest.fixture(scope="module")
def ids(oracle):
    return oracle.tokenizer.encode


@pytest.mark.parametrize("length", [1, 40, 1100])
def test_disaggregated_tokens_equal_offline_engine(oracle, prefill_stub, decode_stub, ids, length):
    prompt = (ids(PASSAGE) * 20)[:length]
    prompt[0] = 1000 + length  # distinct prompts: nothing cached on the decode worker yet
    p, chunks = prefill_then_decode(prefill_stub, decode_stub, prompt, rid=f"eq-{length}")
    expected = offline(oracle, prompt)
    assert p.first_token_id == expected[0]
    assert tokens(chunks) == expected
    assert chunks[0].num_kv_blocks_fetched == length // 16
    assert not chunks[0].recomputed
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (length, MAX_TOKENS)
    assert "".join(c.text for c in chunks) == oracle.tokenizer.decode(expected)
    if length >= 16:  # both halves of the handoff went through shared memory
        for direction in ("put", "get"):
            labels = {"direction": direction, "transport": "shm", "tier": "dram"}
            assert REGISTRY.get_sample_value("pdserve_kv_transfer_blocks_total", labels) > 0


def test_second_prompt_sharing_a_prefix(oracle, prefill_stub, decode_stub, ids):
    prefix = [2000] + ids(PASSAGE) * 3
    first = prefix + ids(" Which came first?")
    second = prefix + ids(" Summarise it in one sentence, please.")
    p1, _ = prefill_then_decode(prefill_stub, decode_stub, first, rid="pre-1")
    p2, chunks = prefill_then_decode(prefill_stub, decode_stub, second, rid="pre-2")
    assert p1.num_cached_tokens == 0
    assert p2.num_cached_tokens == len(prefix) // 16 * 16
    assert p2.num_computed_tokens == len(second) - p2.num_cached_tokens
    assert tokens(chunks) == offline(oracle, second)
    # The decode worker already held the shared prefix: it fetched only the new blocks.
    assert chunks[0].num_kv_blocks_fetched == len(second) // 16 - len(prefix) // 16


def test_unreachable_kvstore_recomputes_locally(oracle, prefill_stub, decode_stub, ids):
    prompt = [3000] + ids(PASSAGE) * 2
    dead = f"127.0.0.1:{free_port()}"
    _, chunks = prefill_then_decode(prefill_stub, decode_stub, prompt, rid="dead", kv_address=dead)
    assert chunks[0].recomputed
    assert chunks[0].num_kv_blocks_fetched == 0
    assert tokens(chunks) == offline(oracle, prompt)


def test_kvstore_killed_between_prefill_and_decode(
    oracle, make_kvstore, make_prefill, decode_stub, ids
):
    from pdserve._proto.pdserve.v1 import prefill_pb2_grpc

    store = make_kvstore()
    prefill = make_prefill(f"127.0.0.1:{store.port}")
    channel = grpc.insecure_channel(prefill.address)
    prompt = [4000] + ids(PASSAGE) * 2
    p = prefill_pb2_grpc.PrefillStub(channel).Prefill(
        prefill_pb2.PrefillRequest(request_id="kill", prompt_token_ids=prompt, sampling=greedy()),
        timeout=120,
    )
    channel.close()
    assert len(p.kv.block_keys) == len(prompt) // 16
    store.stop()
    request = decode_pb2.DecodeRequest(
        request_id="kill", prompt_token_ids=prompt, sampling=greedy(),
        first_token_id=p.first_token_id, kv=p.kv,
    )  # fmt: skip
    chunks = list(decode_stub.Decode(request, timeout=60))
    assert chunks[0].recomputed
    assert tokens(chunks) == offline(oracle, prompt)


def test_slow_kvstore_is_abandoned_after_the_fetch_timeout(oracle, prefill_stub, decode_stub, ids):
    """A peer that accepts connections and never answers: the request recomputes after
    kv_fetch_timeout_s instead of hanging."""
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(16)
        address = f"127.0.0.1:{blackhole.getsockname()[1]}"
        prompt = [5000] + ids(PASSAGE) * 2
        start = time.monotonic()
        _, chunks = prefill_then_decode(
            prefill_stub,
            decode_stub,
            prompt,
            rid="slow",
            kv_address=address,
            kv_fetch_timeout_s=0.3,
        )
        elapsed = time.monotonic() - start
    assert chunks[0].recomputed
    assert tokens(chunks) == offline(oracle, prompt)
    assert elapsed < 8


def test_local_prefill_without_kv_source(oracle, decode_stub, ids):
    prompt = [6000] + ids(PASSAGE)
    request = decode_pb2.DecodeRequest(
        request_id="local", prompt_token_ids=prompt, sampling=greedy()
    )
    chunks = list(decode_stub.Decode(request, timeout=120))
    assert tokens(chunks) == offline(oracle, prompt)
    assert chunks[0].num_kv_blocks_fetched == 0 and not chunks[0].recomputed


def test_cancelled_stream_frees_its_blocks(decode, decode_stub, ids):
    prompt = [7000] + ids(PASSAGE) * 2
    request = decode_pb2.DecodeRequest(
        request_id="cancel-me", prompt_token_ids=prompt,
        sampling=greedy(max_tokens=400, ignore_eos=True),
    )  # fmt: skip
    stream = decode_stub.Decode(request, timeout=120)
    next(stream)
    # Load is a snapshot the engine thread refreshes after each step, so the step that sent
    # the first chunk may not be in it yet.
    deadline = time.monotonic() + 10
    busy = decode_stub.Stats(decode_pb2.DecodeStatsRequest(), timeout=5)
    while busy.running != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
        busy = decode_stub.Stats(decode_pb2.DecodeStatsRequest(), timeout=5)
    assert busy.running == 1
    assert busy.num_free_blocks < busy.num_total_blocks
    stream.cancel()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = decode_stub.Stats(decode_pb2.DecodeStatsRequest(), timeout=5)
        if stats.running == 0 and stats.num_free_blocks == stats.num_total_blocks:
            break
        time.sleep(0.02)
    # Free = every block no sequence holds; the cancelled prompt's full blocks stay cached.
    assert (stats.running, stats.waiting) == (0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks
    assert stats.num_cached_blocks >= len(prompt) // 16


def test_concurrent_streams_are_batched_and_correct(oracle, prefill_stub, decode_stub, ids):
    prompts = [[8000 + i] + ids(PASSAGE)[: 20 + 13 * i] for i in range(4)]
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        _, chunks = prefill_then_decode(prefill_stub, decode_stub, prompts[i], rid=f"conc-{i}")
        results[i] = tokens(chunks)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {i: offline(oracle, p) for i, p in enumerate(prompts)}


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(prompt_token_ids=[]), "must not be empty"),
        (
            dict(prompt_token_ids=[1, 2], sampling=common_pb2.SamplingParams(max_tokens=-1)),
            "max_tokens must be >= 1",
        ),
        (
            dict(prompt_token_ids=[1, 2], sampling=common_pb2.SamplingParams(temperature=-1)),
            "temperature",
        ),
        (dict(prompt_token_ids=[7] * 9000), "context"),
        (dict(prompt_token_ids=[1, 2], first_token_id=10**8), "first_token_id"),
        (
            dict(
                prompt_token_ids=[1] * 20,
                kv=common_pb2.KVSource(block_keys=[b"short"], kvstore_address="x:1"),
            ),
            "16 bytes",
        ),
        (dict(prompt_token_ids=[1, 2], kv_fetch_timeout_s=-1), "kv_fetch_timeout_s"),
    ],
)
def test_bad_input_is_invalid_argument(decode_stub, fields, message):
    with pytest.raises(grpc.RpcError) as info:
        list(decode_stub.Decode(decode_pb2.DecodeRequest(**fields), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_load_and_hbm_blocks_are_published(decode, decode_stub, redis_server, serving_cluster, ids):
    prompt = [9000] + ids(PASSAGE) * 2
    list(
        decode_stub.Decode(
            decode_pb2.DecodeRequest(prompt_token_ids=prompt, sampling=greedy()), timeout=60
        )
    )
    worker_id = decode_stub.Stats(decode_pb2.DecodeStatsRequest(), timeout=5).worker_id
    client = connect(redis_server.url)
    layout = RedisLayout(serving_cluster)
    [entry] = [
        w for w in WorkerRegistry(client, layout, 3.0).workers("decode") if w.worker_id == worker_id
    ]
    assert entry.address == f"localhost:{decode.server.port}"
    assert {"running", "waiting", "num_free_blocks"} <= set(entry.load)
    keys = decode.server.worker.engine.block_keys(prompt[: len(prompt) // 16 * 16])
    index = LocationIndex(client, layout)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        index.rebuild()
        held = {p.node_id: p.num_blocks for p in index.longest_prefixes(keys)}
        if held.get(worker_id) == len(keys):
            break
        time.sleep(0.1)
    assert held.get(worker_id) == len(keys)
