"""The router's overlapped handoff against in-memory fakes: the Decode call starts with the
Prefill call and names the prefill worker, and its first chunk may wait for the whole prefill
(the first-chunk timeout grows by the prefill's) without being taken for a stalled worker."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.errors import WorkerFailed
from tests.serving.router_fakes import FakeDecode, FakePrefill
from tests.serving.test_router_core import LONG, expected, make_router, migrations, run


class SlowFirstChunk(FakeDecode):
    """A decode worker whose first chunk comes after the prefill it follows (0.4 s here)."""

    async def stream(self, call):
        await asyncio.sleep(0.4)
        async for chunk in super().stream(call):
            yield chunk


def _slow(router_clients) -> None:
    router_clients.decode_workers = {w: SlowFirstChunk() for w in router_clients.decode_workers}


def test_overlapped_decode_starts_with_the_prefill_and_names_it():
    router, clients = make_router(prefill=("p0",), overlap_handoff=True)
    chunks = run(router, prompt=LONG)
    assert [t for c in chunks for t in c.token_ids] == expected(LONG, 12)
    [call] = clients.decode_workers["d0"].calls + clients.decode_workers["d1"].calls
    assert call.prefill_address == "p0" and call.prefilled is None
    assert len(clients.prefill_workers["p0"].calls) == 1
    assert chunks[0].route.disaggregated and chunks[0].route.prefill_worker == "p0"


def test_first_chunk_may_wait_for_the_prefill_when_overlapped():
    router, clients = make_router(
        prefill=("p0",), overlap_handoff=True, prefill_timeout_s=5.0,
        decode_first_chunk_timeout_s=0.2,
    )  # fmt: skip
    _slow(clients)
    before = migrations("stall")
    chunks = run(router, prompt=LONG)  # 0.4 s: over 0.2 s, within 0.2 s + the prefill's 5 s
    assert [t for c in chunks for t in c.token_ids] == expected(LONG, 12)
    assert migrations("stall") == before


def test_the_same_wait_is_a_stall_without_a_prefill_to_follow():
    router, clients = make_router(decode_first_chunk_timeout_s=0.2)
    _slow(clients)
    before = migrations("stall")
    with pytest.raises(WorkerFailed, match="stall"):
        run(router)  # colocated: every decode worker is slow, the stream moves until the limit
    assert migrations("stall") > before


class RecordsRouterQueues(FakePrefill):
    """Notes, midway through its prefill, the prompt tokens the router believes each worker
    must still compute."""

    def __init__(self, router) -> None:
        super().__init__()
        self.router = router
        self.queued_midway: dict[str, int] = {}

    async def prefill(self, call):
        self.compute_s = 0.05
        task = asyncio.ensure_future(super().prefill(call))
        await asyncio.sleep(0.02)  # the Decode call that follows has started by now
        self.queued_midway = dict(self.router._queued_tokens)
        return await task


def test_an_overlapped_request_queues_its_prompt_on_the_prefill_worker_only():
    """The decode worker following a remote prefill loads the prompt's KV; counting the prompt
    in its queue too made the cost policy see every remote prefill twice and price a local
    prefill at twice the real queue."""
    router, clients = make_router(prefill=("p0",), decode=("d0",), overlap_handoff=True)
    prefill = clients.prefill_workers["p0"] = RecordsRouterQueues(router)
    run(router, prompt=LONG)
    assert prefill.queued_midway.get("p0", 0) == len(LONG.encode())
    assert prefill.queued_midway.get("d0", 0) == 0
