"""The overlapped handoff: the decode worker hears of a request when its prefill starts,
reserves its blocks, follows Prefill.Handoff and pulls each layer group of the prompt's blocks
as it is written (same host: out of the kvstore's staging slots, verified by the block's
checksum), and blocks it could not pull that way once sealed; the first token comes from the
prefill worker. Failures on the prefill side (before or in the middle of a step's layers), a
decode that is cancelled while it follows, and the gRPC transport between two node ids are
covered too."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from pdserve._proto.pdserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from pdserve.engine.sampling_params import SamplingParams
from tests.conftest import free_port
from tests.serving.conftest import BLOCK_BYTES, PASSAGE

MAX_TOKENS = 6
NUM_LAYERS = 30  # SmolLM2-135M; the prefill announces them in 4 groups of up to 8
GROUPS = [(0, 8), (8, 16), (16, 24), (24, 30)]


def staged(what: str = "blocks") -> float:
    """Blocks (or bytes) the decode worker pulled layer by layer out of staging slots."""
    labels = {"direction": "get", "transport": "shm", "tier": "staging"}
    return REGISTRY.get_sample_value(f"pdserve_kv_transfer_{what}_total", labels) or 0.0


def wait_until_idle(decode_stub) -> decode_pb2.DecodeStatsResponse:
    deadline = time.monotonic() + 10
    while True:
        stats = decode_stub.Stats(decode_pb2.DecodeStatsRequest(), timeout=5)
        idle = stats.num_free_blocks == stats.num_total_blocks and stats.waiting == 0
        if idle or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def greedy(max_tokens: int = MAX_TOKENS) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)


def offline(oracle, prompt: list[int]) -> list[int]:
    [done] = oracle.generate([prompt], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    return done.token_ids


def distinct_prompt(oracle, length: int, tag: int) -> list[int]:
    prompt = (oracle.tokenizer.encode(PASSAGE) * 30)[:length]
    prompt[0] = tag  # nothing cached anywhere yet
    return prompt


def overlapped(prefill_stub, decode_stub, prefill_address: str, prompt, rid: str):
    """Start the Decode (following the prefill) first, then the Prefill, as a router may."""
    out: dict = {}

    def run_prefill() -> None:
        time.sleep(0.2)  # the decode asks before the prefill arrives
        request = prefill_pb2.PrefillRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=greedy()
        )
        try:
            out["prefill"] = prefill_stub.Prefill(request, timeout=120)
        except grpc.RpcError as exc:  # a test that makes the prefill fail looks at the decode
            out["error"] = exc

    thread = threading.Thread(target=run_prefill)
    thread.start()
    request = decode_pb2.DecodeRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=greedy(),
        prefill_address=prefill_address,
    )  # fmt: skip
    chunks = list(decode_stub.Decode(request, timeout=120))
    thread.join(120)
    return out.get("prefill"), chunks


def sequential(prefill_stub, decode_stub, prompt, rid: str):
    """The Prefill, then a Decode given its KV (a router without overlap, or a retry)."""
    request = prefill_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=greedy())
    p = prefill_stub.Prefill(request, timeout=120)
    request = decode_pb2.DecodeRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=greedy(),
        first_token_id=p.first_token_id, kv=p.kv,
    )  # fmt: skip
    return p, list(decode_stub.Decode(request, timeout=120))


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def test_overlapped_handoff_equals_offline_engine(
    oracle, kvstore, prefill, prefill_stub, decode_stub
):
    prompt = distinct_prompt(oracle, 1100, 3101)  # three prefill steps of 512 tokens
    before = staged()
    hits = kvstore.node.store.stats().num_hits
    p, chunks = overlapped(prefill_stub, decode_stub, prefill.address, prompt, "ov-1")
    expected = offline(oracle, prompt)
    assert p.first_token_id == expected[0]
    assert tokens(chunks) == expected
    assert chunks[0].num_kv_blocks_fetched == 1100 // 16
    assert not chunks[0].recomputed
    assert chunks[-1].usage.prompt_tokens == 1100
    assert staged() - before == 1100 // 16  # every block layer by layer, none whole after seal
    store = kvstore.node.store.stats()
    assert store.num_hits - hits == 1100 // 16 and store.num_leases == 0  # one pin per step


def test_one_step_prompt_moves_layer_group_by_layer_group(
    oracle, kvstore, prefill, prefill_stub, decode_stub
):
    """A prompt that fits in one prefill step: its blocks still reach the decode worker while
    the step computes (before, there was nothing to overlap with), as reads the kvstore counts
    (one hit per block) under a lease that is given back."""
    prompt = distinct_prompt(oracle, 400, 3108)
    before, before_bytes = staged(), staged("bytes")
    hits = kvstore.node.store.stats().num_hits
    p, chunks = overlapped(prefill_stub, decode_stub, prefill.address, prompt, "ov-7")
    assert tokens(chunks) == offline(oracle, prompt)
    assert chunks[0].num_kv_blocks_fetched == 400 // 16 and not chunks[0].recomputed
    assert staged() - before == 400 // 16
    assert staged("bytes") - before_bytes == 400 // 16 * BLOCK_BYTES  # each layer copied once
    store = kvstore.node.store.stats()
    assert store.num_hits - hits == 400 // 16 and store.num_leases == 0
    stats = wait_until_idle(decode_stub)
    assert (stats.num_free_blocks, stats.waiting) == (stats.num_total_blocks, 0)


def test_follow_reports_the_sealed_prefix_step_by_step(oracle, kvstore, prefill, prefill_stub):
    prompt = distinct_prompt(oracle, 1100, 3102)
    stub = prefill_pb2_grpc.PrefillStub(grpc.insecure_channel(prefill.address))
    events: list = []

    def follow() -> None:
        request = prefill_pb2.HandoffRequest(request_id="ov-2", wait_s=30)
        events.extend(stub.Handoff(request, timeout=120))

    thread = threading.Thread(target=follow)
    thread.start()
    time.sleep(0.2)
    response = prefill_stub.Prefill(
        prefill_pb2.PrefillRequest(request_id="ov-2", prompt_token_ids=prompt, sampling=greedy()),
        timeout=120,
    )
    thread.join(60)
    counts = [len(e.kv.block_keys) for e in events]
    assert counts == sorted(counts) and counts[-1] == 1100 // 16
    assert any(0 < n < 1100 // 16 for n in counts), counts  # blocks came before the end
    assert [e.HasField("done") for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1].done.first_token_id == response.first_token_id
    assert list(events[-1].kv.block_keys) == list(response.kv.block_keys)
    # Every block's layers were announced in four groups, in order, each before its seal;
    # the last group carries the checksum the block was sealed with.
    ranges: dict[bytes, list] = {}
    for i, event in enumerate(events):
        for group in event.layers:
            assert group.layer_nbytes == BLOCK_BYTES // NUM_LAYERS
            assert bool(group.checksums) == (group.layer_end == NUM_LAYERS)
            for j, key in enumerate(group.block_keys):
                ranges.setdefault(key, []).append((group.layer_start, group.layer_end))
                sealed_by_now = key in events[i].kv.block_keys
                assert not sealed_by_now or group.layer_end == NUM_LAYERS
                if group.checksums:
                    assert kvstore.node.store.get(key)[2] == group.checksums[j]
    assert list(ranges) == list(response.kv.block_keys)
    assert all(r == GROUPS for r in ranges.values()), ranges
    assert any(e.layers and not e.HasField("done") for e in events)
    # A follower that comes after the end gets the result at once.
    late = list(stub.Handoff(prefill_pb2.HandoffRequest(request_id="ov-2"), timeout=10))
    assert len(late) == 1 and late[0].done.first_token_id == response.first_token_id


def test_unknown_prefill_is_not_found(prefill):
    stub = prefill_pb2_grpc.PrefillStub(grpc.insecure_channel(prefill.address))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Handoff(prefill_pb2.HandoffRequest(request_id="never", wait_s=0.2), timeout=10))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_unreachable_prefill_worker_falls_back_to_local_recompute(oracle, decode_stub):
    prompt = distinct_prompt(oracle, 300, 3103)
    request = decode_pb2.DecodeRequest(
        request_id="ov-3", prompt_token_ids=prompt, sampling=greedy(),
        prefill_address=f"127.0.0.1:{free_port()}",
    )  # fmt: skip
    chunks = list(decode_stub.Decode(request, timeout=120))
    assert tokens(chunks) == offline(oracle, prompt)
    assert chunks[0].recomputed and chunks[0].num_kv_blocks_fetched == 0


def fails_mid_layers_then_recomputes(
    oracle, worker, prefill_stub, decode_stub, address, store, pulled, seed, request_id,
    monkeypatch,
) -> None:  # fmt: skip
    """The prefill's step fails at layer 20, once the decode worker has pulled its first
    groups (``pulled``: the counter of its layer reads): the decode recomputes (same tokens),
    nothing partial is committed, no lease is left, and the decode pool, the prefill pool and
    the kvstore's staging area are all released."""
    hook = worker._on_layer_done
    before, before_bytes = pulled(), pulled("bytes")

    def fail_at_layer_20(layer: int, plan) -> None:
        hook(layer, plan)
        if layer == 20:
            deadline = time.monotonic() + 10
            while pulled("bytes") == before_bytes and time.monotonic() < deadline:
                time.sleep(0.01)  # let the decode worker copy the first groups
            raise RuntimeError("injected failure at layer 20")

    monkeypatch.setattr(worker, "_on_layer_done", fail_at_layer_20)
    prompt = distinct_prompt(oracle, 400, seed)
    p, chunks = overlapped(prefill_stub, decode_stub, address, prompt, request_id)
    monkeypatch.undo()
    assert p is None  # the Prefill call failed
    assert pulled("bytes") > before_bytes and pulled() == before  # pulled, never verified
    assert tokens(chunks) == offline(oracle, prompt)
    assert chunks[0].recomputed and chunks[0].num_kv_blocks_fetched == 0
    stats = wait_until_idle(decode_stub)
    assert (stats.num_free_blocks, stats.waiting) == (stats.num_total_blocks, 0)
    assert worker.engine.num_free_kv_blocks == worker.engine.num_kv_blocks
    kv = store.stats()
    assert (kv.num_leases, kv.num_staging_blocks) == (0, 0)  # the decode's pins given back
    keys = oracle.block_keys(prompt[: 400 // 16 * 16])
    assert store.lookup(keys).prefix_blocks == 0  # nothing sealed half-written


def test_prefill_failing_mid_layers_falls_back_and_releases_both_sides(
    oracle, kvstore, prefill, prefill_stub, decode_stub, monkeypatch
):
    """Same host: the first groups were copied from the segment into the reservation."""
    fails_mid_layers_then_recomputes(
        oracle, prefill.server.worker, prefill_stub, decode_stub, prefill.address,
        kvstore.node.store, staged, 3109, "ov-8", monkeypatch,
    )  # fmt: skip


def test_decode_cancelled_while_following_releases_its_reservation(oracle, prefill, decode_stub):
    prompt = distinct_prompt(oracle, 400, 3104)  # its prefill never comes
    request = decode_pb2.DecodeRequest(
        request_id="ov-4", prompt_token_ids=prompt, sampling=greedy(),
        prefill_address=prefill.address,
    )  # fmt: skip
    stream = decode_stub.Decode(request, timeout=120)
    deadline = time.monotonic() + 10
    stats = decode_stub.Stats(decode_pb2.DecodeStatsRequest(), timeout=5)
    while stats.num_free_blocks == stats.num_total_blocks and time.monotonic() < deadline:
        time.sleep(0.02)  # the reservation is made on the engine thread
        stats = decode_stub.Stats(decode_pb2.DecodeStatsRequest(), timeout=5)
    assert stats.num_total_blocks - stats.num_free_blocks == 400 // 16
    stream.cancel()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = decode_stub.Stats(decode_pb2.DecodeStatsRequest(), timeout=5)
        if stats.num_free_blocks == stats.num_total_blocks and stats.waiting == 0:
            break
        time.sleep(0.02)
    assert (stats.num_free_blocks, stats.waiting) == (stats.num_total_blocks, 0)


@pytest.fixture(scope="module")
def across_nodes(make_kvstore, make_prefill, make_decode):
    """The compose / Kubernetes path: a kvstore and a prefill worker on node-a, a decode worker
    on node-b; (kvstore, prefill worker, prefill stub, decode stub)."""
    store = make_kvstore(node_id="node-a")
    prefill_a = make_prefill(f"127.0.0.1:{store.port}", node_id="node-a")
    decode_b = make_decode(node_id="node-b")
    with (
        grpc.insecure_channel(prefill_a.address) as pch,
        grpc.insecure_channel(decode_b.address) as dch,
    ):
        yield store, prefill_a, prefill_pb2_grpc.PrefillStub(pch), decode_pb2_grpc.DecodeStub(dch)


def pulled_over_grpc(what: str = "blocks") -> float:
    """Blocks (or bytes) a decode worker pulled layer by layer with GetStaged."""
    labels = {"direction": "get", "transport": "grpc", "tier": "staging"}
    return REGISTRY.get_sample_value(f"pdserve_kv_transfer_{what}_total", labels) or 0.0


def test_prefill_and_decode_on_different_nodes_hand_off_over_grpc(oracle, across_nodes):
    """The decode worker's node differs from the kvstore's, so no shared memory: overlapped,
    each layer group of every block moves with one GetStaged call as the prefill writes it
    (verified by the same checksums); sequential, the sealed blocks come over the Get stream."""

    def grpc_gets() -> float:
        labels = {"direction": "get", "transport": "grpc", "tier": "dram"}
        return REGISTRY.get_sample_value("pdserve_kv_transfer_blocks_total", labels) or 0.0

    store, prefill_a, pstub, dstub = across_nodes
    prompt = distinct_prompt(oracle, 400, 3105)  # one step: 25 blocks in 4 groups of layers
    before, before_bytes, gets = pulled_over_grpc(), pulled_over_grpc("bytes"), grpc_gets()
    hits = store.node.store.stats().num_hits
    p, chunks = overlapped(pstub, dstub, prefill_a.address, prompt, "ov-5")
    assert p.kv.node_id == "node-a"
    assert tokens(chunks) == offline(oracle, prompt)
    assert chunks[0].num_kv_blocks_fetched == 400 // 16 and not chunks[0].recomputed
    assert pulled_over_grpc() - before == 400 // 16  # every block layer by layer
    assert pulled_over_grpc("bytes") - before_bytes == 400 // 16 * BLOCK_BYTES  # each layer once
    stats = store.node.store.stats()
    assert stats.num_leases == 0 and stats.num_staging_blocks == 0
    assert stats.num_hits - hits == 4 * (400 // 16)  # a hit per block per group's call
    # The kvstore counts each GetStaged range as a block moved; a block fetched whole after
    # its seal would add two more (both ends count a Get stream's blocks).
    assert grpc_gets() - gets == 4 * (400 // 16)
    gets = grpc_gets()

    # The sequential path (router without overlap, or a retry) takes the same transport.
    prompt2 = distinct_prompt(oracle, 100, 3106)
    _, chunks2 = sequential(pstub, dstub, prompt2, "ov-6")
    assert tokens(chunks2) == offline(oracle, prompt2)
    assert chunks2[0].num_kv_blocks_fetched == 100 // 16
    # Both ends count the Get stream's blocks (the kvstore runs in this process too).
    assert grpc_gets() - gets == 2 * (100 // 16)


def test_prefill_failing_mid_layers_across_nodes_leaves_no_lease_and_recomputes(
    oracle, across_nodes, monkeypatch
):
    """Across nodes: the decode worker on node-b pulled the first groups with GetStaged from
    the kvstore of the prefill on node-a."""
    store, prefill_a, pstub, dstub = across_nodes
    fails_mid_layers_then_recomputes(
        oracle, prefill_a.server.worker, pstub, dstub, prefill_a.address,
        store.node.store, pulled_over_grpc, 3111, "ov-9", monkeypatch,
    )  # fmt: skip


def test_decode_cancelled_mid_layers_across_nodes_leaves_no_lease(
    oracle, across_nodes, monkeypatch
):
    """The client goes away while the decode worker on node-b pulls a step's layers with
    GetStaged: its reservation is released, no lease is left in the kvstore, and the prefill
    on node-a completes and seals its blocks as usual."""
    store, prefill_a, pstub, dstub = across_nodes
    worker = prefill_a.server.worker
    hook = worker._on_layer_done
    before_bytes = pulled_over_grpc("bytes")
    prompt = distinct_prompt(oracle, 400, 3112)
    request = decode_pb2.DecodeRequest(
        request_id="ov-10", prompt_token_ids=prompt, sampling=greedy(),
        prefill_address=prefill_a.address,
    )  # fmt: skip
    stream = dstub.Decode(request, timeout=120)

    def cancel_at_layer_20(layer: int, plan) -> None:
        hook(layer, plan)
        if layer == 20:
            deadline = time.monotonic() + 10
            while pulled_over_grpc("bytes") == before_bytes and time.monotonic() < deadline:
                time.sleep(0.01)  # the decode worker pulls the first groups
            stream.cancel()

    monkeypatch.setattr(worker, "_on_layer_done", cancel_at_layer_20)
    time.sleep(0.2)  # the decode follows before the prefill arrives
    p = pstub.Prefill(
        prefill_pb2.PrefillRequest(request_id="ov-10", prompt_token_ids=prompt,
                                   sampling=greedy()), timeout=120,
    )  # fmt: skip
    monkeypatch.undo()
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert pulled_over_grpc("bytes") > before_bytes  # it was pulling when it went away
    assert p.first_token_id == offline(oracle, prompt)[0]
    stats = wait_until_idle(dstub)
    assert (stats.num_free_blocks, stats.waiting) == (stats.num_total_blocks, 0)
    kv = store.node.store.stats()
    assert (kv.num_leases, kv.num_staging_blocks) == (0, 0)
    keys = oracle.block_keys(prompt[: 400 // 16 * 16])
    assert store.node.store.lookup(keys).prefix_blocks == 400 // 16  # sealed by the prefill


def test_int8_wire_compression_across_nodes_completes_the_request(
    oracle, make_kvstore, make_prefill, make_decode
):
    """kv_compression=int8 on a decode worker of another node: its blocks arrive int8-encoded
    over gRPC, are decoded into its pool, and the request runs on them (no recompute)."""
    store = make_kvstore(node_id="node-c")
    prefill_c = make_prefill(f"127.0.0.1:{store.port}", node_id="node-c")
    decode_d = make_decode(node_id="node-d", kv_compression="int8")
    prompt = distinct_prompt(oracle, 120, 3107)
    with (
        grpc.insecure_channel(prefill_c.address) as pch,
        grpc.insecure_channel(decode_d.address) as dch,
    ):
        pstub = prefill_pb2_grpc.PrefillStub(pch)
        p, chunks = sequential(pstub, decode_pb2_grpc.DecodeStub(dch), prompt, "int8-1")
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert len(tokens(chunks)) == MAX_TOKENS
    assert tokens(chunks)[0] == p.first_token_id  # the prefill worker's token comes first
    assert chunks[0].num_kv_blocks_fetched == 120 // 16 and not chunks[0].recomputed
