"""The prefill worker over real gRPC: first token, layer-by-layer handoff into a real kvstore,
prefix reuse from the kvstore, registry entry, bad input, cancellation."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve._proto.pdserve.v1 import common_pb2, prefill_pb2
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv.grpc_transport import GrpcTransport
from pdserve.kv.metadata import RedisLayout, WorkerRegistry, connect
from tests.serving.conftest import BLOCK_BYTES

GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=8)


def _ids(oracle, text: str) -> list[int]:
    return oracle.tokenizer.encode(text)


def test_first_token_and_blocks_land_in_the_kvstore(oracle, prefill_stub, kvstore):
    prompt = _ids(oracle, "The lighthouse keeper counted the ships that passed each night. " * 4)
    assert len(prompt) > 40
    response = prefill_stub.Prefill(
        prefill_pb2.PrefillRequest(request_id="p-1", prompt_token_ids=prompt, sampling=GREEDY),
        timeout=60,
    )
    [expected] = oracle.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))
    assert response.first_token_id == expected.token_ids[0]
    keys = oracle.block_keys(prompt[: len(prompt) // 16 * 16])
    assert list(response.kv.block_keys) == keys
    assert response.kv.kvstore_address == f"127.0.0.1:{kvstore.port}"
    assert response.num_computed_tokens + response.num_cached_tokens == len(prompt)

    # Every block was sealed (its layer-by-layer pieces verified against the whole-block
    # checksum); the decode tests check that the bytes reproduce the offline engine's tokens.
    with GrpcTransport(f"127.0.0.1:{kvstore.port}") as kv:
        stored = kv.get_blocks(keys)
    assert all(b is not None and len(b) == BLOCK_BYTES for b in stored)


def test_shared_prefix_is_loaded_not_recomputed(oracle, prefill_stub):
    prefix = _ids(
        oracle, "Rivers carve valleys over millions of years, moving sediment seaward. " * 6
    )
    first = prefix + _ids(oracle, " The first question is about deltas.")
    second = prefix + _ids(oracle, " The second question is about canyons and erosion.")
    r1 = prefill_stub.Prefill(
        prefill_pb2.PrefillRequest(request_id="s-1", prompt_token_ids=first, sampling=GREEDY),
        timeout=60,
    )
    r2 = prefill_stub.Prefill(
        prefill_pb2.PrefillRequest(request_id="s-2", prompt_token_ids=second, sampling=GREEDY),
        timeout=60,
    )
    assert r1.num_cached_tokens == 0
    assert r2.num_cached_tokens == len(prefix) // 16 * 16
    assert r2.num_computed_tokens == len(second) - r2.num_cached_tokens
    [expected] = oracle.generate([second], SamplingParams(temperature=0.0, max_tokens=1))
    assert r2.first_token_id == expected.token_ids[0]


def test_logprobs_of_the_first_token(oracle, prefill_stub):
    prompt = _ids(oracle, "Name three primary colours:")
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=4, logprobs=3)
    r = prefill_stub.Prefill(
        prefill_pb2.PrefillRequest(request_id="lp", prompt_token_ids=prompt, sampling=sampling),
        timeout=60,
    )
    assert r.first_logprob.token_id == r.first_token_id
    assert len(r.first_logprob.top) == 3
    assert r.first_logprob.top[0].token_id == r.first_token_id
    assert r.first_logprob.logprob <= 0


@pytest.mark.parametrize(
    "request_kwargs, message",
    [
        (dict(prompt_token_ids=[]), "must not be empty"),
        (dict(prompt_token_ids=[1, 2, 10**7]), "prompt token ids must be in"),
        (
            dict(prompt_token_ids=[1, 2], sampling=common_pb2.SamplingParams(max_tokens=-3)),
            "max_tokens",
        ),
        (dict(prompt_token_ids=[1, 2], sampling=common_pb2.SamplingParams(top_p=1.5)), "top_p"),
        (dict(prompt_token_ids=[5] * 9000), "context"),
    ],
)
def test_bad_input_is_invalid_argument(prefill_stub, request_kwargs, message):
    with pytest.raises(grpc.RpcError) as info:
        prefill_stub.Prefill(prefill_pb2.PrefillRequest(**request_kwargs), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_health_stats_and_registry(prefill, prefill_stub, redis_server, serving_cluster):
    channel = grpc.insecure_channel(prefill.address)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()
    stats = prefill_stub.Stats(prefill_pb2.PrefillStatsRequest(), timeout=5)
    assert stats.worker_id == f"prefill-localhost-{prefill.server.port}"
    registry = WorkerRegistry(connect(redis_server.url), RedisLayout(serving_cluster), 3.0)
    [entry] = [w for w in registry.workers("prefill") if w.worker_id == stats.worker_id]
    assert entry.address == f"localhost:{prefill.server.port}"
    assert entry.node_id == "localhost"
    assert {"running", "waiting", "num_free_blocks"} <= set(entry.load)


def test_deadline_aborts_and_frees_blocks(oracle, prefill, prefill_stub):
    prompt = _ids(oracle, "An extremely long essay about the history of clocks. " * 60)
    with pytest.raises(grpc.RpcError) as info:
        prefill_stub.Prefill(
            prefill_pb2.PrefillRequest(request_id="late", prompt_token_ids=prompt, sampling=GREEDY),
            timeout=0.05,
        )
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    worker = prefill.server.worker
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (worker.load.running or worker.load.waiting):
        time.sleep(0.05)
    assert worker.load.running == worker.load.waiting == 0
    assert worker.load.num_free_blocks == worker.engine.block_manager.num_blocks


def test_unreachable_kvstore_still_returns_the_first_token(oracle, make_prefill):
    """No kvstore: nothing can be handed off, so the KV source lists no blocks (the decode
    worker recomputes), but the first token is still right."""
    from pdserve._proto.pdserve.v1 import prefill_pb2_grpc
    from tests.conftest import free_port

    prefill = make_prefill(f"127.0.0.1:{free_port()}")
    channel = grpc.insecure_channel(prefill.address)
    prompt = _ids(oracle, "Glaciers advance and retreat with the climate. " * 5)
    r = prefill_pb2_grpc.PrefillStub(channel).Prefill(
        prefill_pb2.PrefillRequest(request_id="nokv", prompt_token_ids=prompt, sampling=GREEDY),
        timeout=60,
    )
    channel.close()
    [expected] = oracle.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))
    assert r.first_token_id == expected.token_ids[0]
    assert list(r.kv.block_keys) == []
    assert r.num_computed_tokens == len(prompt)
