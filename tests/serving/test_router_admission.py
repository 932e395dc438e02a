"""Backpressure predictions (services/router/admission.py): exact waits on tiny workers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest

from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequest, Overloaded
from services.router.admission import DecodeCapacity, Inflight, blocks_needed, decode_wait_s
from services.router.messages import GenerateInput
from services.router.router import Router
from tests.serving.test_router_core import make_router


def worker(**fields) -> DecodeCapacity:
    base = dict(max_num_seqs=2, num_total_blocks=10, num_free_blocks=None, num_reported_seqs=0,
                step_s=0.1)  # fmt: skip
    return DecodeCapacity(**{**base, **fields})


def test_an_idle_worker_takes_the_request_at_once():
    assert decode_wait_s(worker(), 10) == 0.0
    assert decode_wait_s(worker(), 11) is None  # more than the whole pool: never


def test_a_full_batch_waits_for_the_shortest_request_ahead():
    busy = worker(inflight=(Inflight(50, 2), Inflight(20, 2)))
    assert decode_wait_s(busy, 2) == pytest.approx(2.0)  # 20 steps of 0.1 s free a slot


def test_kv_blocks_wait_for_enough_requests_to_finish():
    busy = worker(max_num_seqs=8, inflight=(Inflight(5, 4), Inflight(30, 4), Inflight(90, 1)))
    assert decode_wait_s(busy, 1) == 0.0  # 1 block free now
    assert decode_wait_s(busy, 5) == pytest.approx(0.5)  # after the 5-token one: 5 free
    assert decode_wait_s(busy, 9) == pytest.approx(3.0)  # after the 30-token one: 9 free


def test_reported_free_blocks_and_other_routers_sequences_count():
    assert decode_wait_s(worker(num_free_blocks=1), 2) == 0.0  # (nothing of ours to wait for)
    others = worker(num_reported_seqs=2, unknown_remaining_tokens=40)
    assert decode_wait_s(others, 1) == pytest.approx(4.0)


def test_blocks_needed_rounds_up():
    assert [blocks_needed(n, 16) for n in (1, 16, 17)] == [1, 1, 2]


def _generate(router, prompt: str, max_tokens: int):
    inp = GenerateInput(prompt=prompt, params=SamplingParams(max_tokens=max_tokens))

    async def collect():
        async with contextlib.aclosing(router.generate(inp, deadline_s=3.0)) as stream:
            return [chunk async for chunk in stream]

    return asyncio.run(collect())


def test_a_decode_worker_that_cannot_start_in_time_gets_429_with_its_drain_time():
    router, _ = make_router(decode=("d0",))
    info = router.directory.infos[0]
    router.directory.infos[0] = dataclasses.replace(
        info, capacity={"max_num_seqs": 2, "num_blocks": 64},
        load={"running": 2, "waiting": 0, "num_free_blocks": 0, "step_s": 0.5},
    )  # fmt: skip
    with pytest.raises(Overloaded) as refused:
        _generate(router, "Hi", 4)
    # two sequences of unknown length (256 tokens) ahead at 0.5 s a step: 128 s to drain
    assert refused.value.retry_after_s == 128 and refused.value.reason_class == "deadline"
    with pytest.raises(InvalidRequest, match="needs 65 KV blocks; decode worker d0 holds 64"):
        _generate(router, "Hi", 1024)


def test_two_router_replicas_share_one_admission_limit():
    """Replicas behind one address: each counts the requests the other admitted (its
    heartbeat), so the cluster holds max_inflight_requests, not that many per replica."""
    first, clients = make_router(max_inflight_requests=2)
    second = Router(first.settings, first.model, first.directory, clients, router_id="r2")
    first.router_id = "r1"
    first.directory.routers = {"r1": first, "r2": second}
    for worker in clients.decode_workers.values():
        worker.stall_after = 1  # streams stay open: admitted and not finished

    async def main():
        streams = [
            first.generate(GenerateInput(prompt=f"Hi {i}", params=SamplingParams(max_tokens=4)))
            for i in range(2)
        ]
        for stream in streams:
            await anext(stream)  # admitted on the first replica
        refused = second.generate(GenerateInput(prompt="Hi", params=SamplingParams(max_tokens=4)))
        with pytest.raises(Overloaded) as exc:
            await anext(refused)
        for stream in streams:
            await stream.aclose()
        return exc.value

    refusal = asyncio.run(main())
    assert refusal.reason_class == "queue_full" and "(2/2 requests)" in refusal.message
    assert first.num_inflight == 0


def test_a_replica_alone_admits_up_to_the_limit():
    router, clients = make_router(max_inflight_requests=2)
    router.router_id = "r1"
    router.directory.routers = {"r1": router}  # itself only: not counted twice
    assert len(_generate(router, "Hi", 2)) == 2
