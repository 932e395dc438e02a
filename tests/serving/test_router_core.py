"""The router's core against in-memory fakes (no Redis, no gRPC, no model): migration of a
stream whose decode worker fails, prefill retries, and what counts as a dead worker."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from prometheus_client import REGISTRY

from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import Failure, InvalidRequest, WorkerFailed
from pdserve.wire import KVSource
from services.router.messages import GenerateInput
from services.router.router import Router
from services.router.settings import RouterSettings
from tests.serving.router_fakes import FakeClients, FakeDirectory, model_info, token_at

PROMPT = "Tell me about consensus."
LONG = "word " * 60  # 300 tokens: above the disaggregation threshold


def make_router(prefill=(), decode=("d0", "d1"), **overrides):
    fields = dict(disagg_threshold_tokens=128, disaggregation_policy="threshold",
                  decode_stall_timeout_s=0.2,
                  decode_first_chunk_timeout_s=0.5, http_port=0)  # fmt: skip
    fields.update(overrides)
    clients = FakeClients(prefill, decode)
    router = Router(RouterSettings(**fields), model_info(), FakeDirectory(prefill, decode), clients)
    return router, clients


def run(router, prompt=PROMPT, **params):
    params.setdefault("max_tokens", 12)
    inp = GenerateInput(prompt=prompt, params=SamplingParams(**params))

    async def collect():
        async with contextlib.aclosing(router.generate(inp)) as stream:
            return [chunk async for chunk in stream]

    return asyncio.run(collect())


def expected(prompt: str, n: int) -> list[int]:
    ids = list(prompt.encode())
    return [token_at(ids, i) for i in range(n)]


def migrations(reason: str) -> float:
    return REGISTRY.get_sample_value("pdserve_router_migrations_total", {"reason": reason}) or 0.0


def test_a_decode_worker_dying_mid_stream_is_invisible_to_the_client():
    router, clients = make_router()
    clients.decode_workers["d0"].die_after = 5
    before = migrations("unavailable")
    chunks = run(router)
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == expected(PROMPT, 12)  # nothing lost, nothing repeated
    assert "".join(c.text for c in chunks) == "".join(f"<{t}>" for t in tokens)
    [moved] = clients.decode_workers["d1"].calls
    assert moved.resume_token_ids == tuple(tokens[:5]) and moved.prefilled is None
    last = chunks[-1]
    assert last.finish_reason == "length" and last.usage.completion_tokens == 12
    assert chunks[0].route.decode_worker == "d0" and all(c.route is None for c in chunks[1:])
    assert migrations("unavailable") - before == 1
    assert [w.worker_id for w in router._alive("decode")] == ["d1"]  # d0 is out of rotation


def test_a_stalled_worker_loses_the_request_but_stays_in_rotation():
    router, clients = make_router()
    clients.decode_workers["d0"].stall_after = 3
    before = migrations("stall")
    tokens = [t for c in run(router) for t in c.token_ids]
    assert tokens == expected(PROMPT, 12)
    assert migrations("stall") - before == 1
    assert {w.worker_id for w in router._alive("decode")} == {"d0", "d1"}  # busy, not dead


def test_an_overloaded_worker_hands_the_request_to_another():
    router, clients = make_router()
    clients.decode_workers["d0"].refuse = Failure.OVERLOADED
    tokens = [t for c in run(router) for t in c.token_ids]
    assert tokens == expected(PROMPT, 12)
    assert {w.worker_id for w in router._alive("decode")} == {"d0", "d1"}


def test_a_lone_decode_worker_that_stalls_is_tried_again():
    router, clients = make_router(decode=("d0",))
    worker = clients.decode_workers["d0"]
    worker.stall_after = 4
    original = worker.stream

    async def recover(call):  # the second call finds it responsive again
        worker.stall_after = None if worker.calls else 4
        async for chunk in original(call):
            yield chunk

    worker.stream = recover
    tokens = [t for c in run(router) for t in c.token_ids]
    assert tokens == expected(PROMPT, 12)
    assert [len(c.resume_token_ids) for c in worker.calls] == [0, 4]


def test_migration_is_bounded_by_migration_limit():
    router, clients = make_router(decode=("d0", "d1", "d2", "d3", "d4"), migration_limit=2)
    for worker in clients.decode_workers.values():
        worker.die_after = 2
    with pytest.raises(WorkerFailed, match="after 6 tokens: .*migration limit 2 reached"):
        run(router, max_tokens=20)
    assert sum(len(w.calls) for w in clients.decode_workers.values()) == 3


def test_no_migration_when_the_limit_is_zero_or_no_worker_is_left():
    router, clients = make_router(migration_limit=0)
    clients.decode_workers["d0"].die_after = 1
    with pytest.raises(WorkerFailed, match="migration limit 0 reached"):
        run(router)
    router, clients = make_router(decode=("d0",))
    clients.decode_workers["d0"].die_after = 1
    with pytest.raises(WorkerFailed, match="no other decode worker to continue on"):
        run(router)


def test_a_request_the_worker_calls_invalid_is_not_migrated():
    router, clients = make_router()
    clients.decode_workers["d0"].refuse = Failure.INVALID
    with pytest.raises(InvalidRequest):
        run(router)
    assert not clients.decode_workers["d1"].calls


def test_a_disaggregated_request_whose_decode_dies_before_its_first_token_restarts_cleanly():
    router, clients = make_router(prefill=("p0",))
    clients.decode_workers["d0"].die_after = 0
    chunks = run(router, prompt=LONG)
    assert chunks[0].route.disaggregated
    # the prefill worker's first token, then the rest, from d1 which prefilled locally
    assert [t for c in chunks for t in c.token_ids] == expected(LONG, 12)
    [moved] = clients.decode_workers["d1"].calls
    assert moved.resume_token_ids == () and moved.prefilled is None


def test_a_failed_prefill_is_retried_on_the_other_worker():
    """Deterministic: p0 wins the tie (smallest id), fails, and p1 serves the retry."""
    router, clients = make_router(prefill=("p0", "p1"), overlap_handoff=False)
    clients.prefill_workers["p0"].fail = Failure.UNAVAILABLE
    chunks = run(router, prompt=LONG)
    route = chunks[0].route
    assert len(clients.prefill_workers["p0"].calls) == 1
    assert len(clients.prefill_workers["p1"].calls) == 1
    assert route.prefill_worker == "p1" and route.prefill_attempts == 2
    assert route.reason.startswith("prefill on p0 failed (unavailable); ")
    assert [t for c in chunks for t in c.token_ids] == expected(LONG, 12)
    assert [w.worker_id for w in router._alive("prefill")] == ["p1"]


def test_logprobs_ride_through_a_migration():
    router, clients = make_router()
    clients.decode_workers["d0"].die_after = 3
    chunks = run(router, logprobs=1)
    assert [lp.token_id for c in chunks for lp in c.logprobs] == expected(PROMPT, 12)


def test_an_overlapped_prefill_dying_mid_prefill_is_retried_on_another_worker():
    """Overlapped handoff: p0 (the tie's winner) dies 0.1 s into the prefill. The decode call
    that followed it is cancelled and both start again with p1; the decode worker never
    recomputes (without a retry it would, after 0.5 s, and p1 would see no call)."""
    router, clients = make_router(prefill=("p0", "p1"), overlap_handoff=True)
    p0, p1 = clients.prefill_workers["p0"], clients.prefill_workers["p1"]
    p0.fail, p0.compute_s = Failure.UNAVAILABLE, 0.1
    chunks = run(router, prompt=LONG)
    assert [t for c in chunks for t in c.token_ids] == expected(LONG, 12)
    assert len(p0.calls) == 1 and len(p1.calls) == 1
    route = chunks[0].route
    assert route.prefill_worker == "p1" and route.prefill_attempts == 2
    assert route.reason.startswith("prefill on p0 failed (unavailable); ")
    decode_calls = [c for w in clients.decode_workers.values() for c in w.calls]
    assert [c.prefill_address for c in decode_calls] == ["p0", "p1"]  # the first, cancelled
    assert [c.request_id for c in decode_calls] == [p0.calls[0].request_id, p1.calls[0].request_id]
    assert p0.calls[0].request_id != p1.calls[0].request_id
    assert not any(w.recomputed for w in clients.decode_workers.values())
    assert {c.request_id for c in chunks} == {p0.calls[0].request_id}  # the client's id
    assert [w.worker_id for w in router._alive("prefill")] == ["p1"]
    assert run(router, prompt="other " * 60)[0].route.prefill_worker == "p1"


def test_overlapped_prefills_failing_everywhere_fall_back_to_a_local_prefill():
    router, clients = make_router(prefill=("p0", "p1"), overlap_handoff=True)
    for worker in clients.prefill_workers.values():
        worker.fail = Failure.OVERLOADED  # busy, not dead: both stay in rotation
    chunks = run(router, prompt=LONG)
    assert [t for c in chunks for t in c.token_ids] == expected(LONG, 12)
    route = chunks[0].route
    assert not route.disaggregated and route.prefill_attempts == 2
    assert route.reason.startswith(
        "prefill on p0 failed (overloaded); prefill on p1 failed (overloaded); "
    )
    calls = [c for w in clients.decode_workers.values() for c in w.calls]
    assert [c.prefill_address for c in calls] == ["p0", "p1", None]  # the last prefills itself
    assert calls[-1].prefilled is None
    assert {w.worker_id for w in router._alive("prefill")} == {"p0", "p1"}


def test_an_overlapped_prefill_that_fails_after_the_decode_recomputed_is_not_retried():
    """The decode worker's first token came first (its handoff broke at once and it
    recomputed before the router heard of the failure): the stream goes on from there."""
    router, clients = make_router(prefill=("p0", "p1"), overlap_handoff=True)
    p0 = clients.prefill_workers["p0"]
    p0.fail, p0.compute_s = Failure.UNAVAILABLE, 0.3
    for worker in clients.decode_workers.values():
        worker.recompute_s = 0.0

    async def broken_handoff(request_id):
        return False  # the Handoff stream broke at once

    p0.handoff = broken_handoff
    chunks = run(router, prompt=LONG)
    assert [t for c in chunks for t in c.token_ids] == expected(LONG, 12)
    assert chunks[0].route.prefill_worker == "p0" and chunks[0].route.prefill_attempts == 1
    assert [len(w.recomputed) for w in clients.decode_workers.values()] == [1, 0]
    assert not clients.prefill_workers["p1"].calls


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
def test_a_migrated_disaggregated_request_fetches_the_prompt_blocks_the_prefill_stored(overlap):
    router, clients = make_router(prefill=("p0",), overlap_handoff=overlap)
    clients.decode_workers["d0"].die_after = 4
    chunks = run(router, prompt=LONG)
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == expected(LONG, 12)
    [moved] = clients.decode_workers["d1"].calls
    assert moved.kv == KVSource((b"k" * 16,), "kvstore:1", "n")  # FakePrefill's blocks
    assert moved.resume_token_ids == tuple(tokens[:4]) and moved.prefilled is None
    assert moved.prefill_address is None


def test_a_migrated_request_decode_worker_prefilled_has_no_blocks_to_fetch():
    router, clients = make_router(prefill=("p0",))
    clients.decode_workers["d0"].die_after = 4
    assert run(router)[0].route.disaggregated is False  # short: prefilled on d0
    [moved] = clients.decode_workers["d1"].calls
    assert moved.kv is None


def test_a_migrated_call_carries_the_stored_blocks_to_the_decode_worker():
    from services.decode.server import spec_from_proto
    from services.router.messages import DecodeCall
    from services.router.workers import decode_request

    kv = KVSource((b"k" * 16, b"j" * 16), "kvstore:1", "n")
    call = DecodeCall("r.1", [1] * 40, SamplingParams(max_tokens=8), None,
                      resume_token_ids=(5, 6), kv=kv)  # fmt: skip
    msg = decode_request(call)
    assert not msg.HasField("first_token_id") and not msg.prefill_address
    spec = spec_from_proto(msg, vocab_size=100)  # what the decode worker accepts
    assert spec.kv == kv and spec.resume_token_ids == (5, 6) and spec.first_token is None
