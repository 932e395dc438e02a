"""A request that must go back to the decode worker it stalled on (no other is alive) gets a
worker-side id of its own: the worker frees the abandoned call's id only when its abort is
processed, after the router has already sent the retry (the goodput run of issue 16 saw
every such retry refused with "request_id ... is already in use")."""

from __future__ import annotations

import asyncio

from pdserve.errors import Failure, WorkerCallError
from services.router.messages import DecodeCall
from tests.serving.router_fakes import FakeDecode
from tests.serving.test_router_core import PROMPT, expected, make_router, run


class AbortsLater(FakeDecode):
    """Like the real worker: an id stays in use until the abort of its stream lands."""

    def __init__(self) -> None:
        super().__init__()
        self.active: set[str] = set()

    async def stream(self, call: DecodeCall):
        if call.request_id in self.active:
            message = f"INVALID_ARGUMENT: request_id {call.request_id!r} is already in use"
            raise WorkerCallError(Failure.INVALID, message)
        self.active.add(call.request_id)
        if self.calls:  # only the first call stalls
            self.stall_after = None
        try:
            async for chunk in super().stream(call):
                yield chunk
        finally:
            asyncio.get_running_loop().call_later(0.05, self.active.discard, call.request_id)


def test_a_stalled_request_retried_on_the_same_worker_uses_a_fresh_call_id():
    router, clients = make_router(decode=("d0",))
    worker = clients.decode_workers["d0"] = AbortsLater()
    worker.stall_after = 3
    chunks = run(router)
    assert [t for c in chunks for t in c.token_ids] == expected(PROMPT, 12)
    first, retry = worker.calls
    assert first.request_id != retry.request_id
    assert retry.request_id.startswith(first.request_id)
    assert {c.request_id for c in chunks} == {first.request_id}  # the client's id is unchanged
