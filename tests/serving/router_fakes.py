"""In-memory stand-ins for the router's worker directory and worker clients, so the router's
core runs in tests with no Redis, no gRPC and no model.

FakeDecode is a deterministic "model": the token at output position i of a prompt depends
only on (prompt, i), and a call with ``resume_token_ids`` continues at position
len(resume_token_ids), as a real decode worker does. A stream the router stitches together
across workers must therefore equal one worker's uninterrupted stream exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from pdserve.engine.sampler import SampledToken
from pdserve.errors import Failure, WorkerCallError
from pdserve.kv.metadata import NodePrefix, WorkerInfo
from pdserve.wire import KVSource
from services.router.messages import DecodeCall, PrefillCall, Prefilled, Usage, WorkerChunk
from services.router.router import ModelInfo
from services.router.workers import WorkerClients, WorkerDirectory

VOCAB = 1000


class ByteTokenizer:
    """One token per UTF-8 byte; chat turns joined as "role: content\\n"."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{t}>" for t in token_ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> list[int]:
        return self.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages))


def model_info(max_model_len: int = 4096) -> ModelInfo:
    return ModelInfo("fake-model", ByteTokenizer(), "fp", VOCAB, max_model_len)


def token_at(prompt: Sequence[int], position: int) -> int:
    return (sum(prompt) * 31 + position * 7919) % VOCAB


class FakeDirectory(WorkerDirectory):
    def __init__(self, prefill: Sequence[str] = (), decode: Sequence[str] = ()) -> None:
        self.infos = [WorkerInfo(w, "prefill", w, "n-" + w) for w in prefill]
        self.infos += [WorkerInfo(w, "decode", w, "n-" + w) for w in decode]

        self.routers: dict[str, object] = {}  # router id -> Router (replicas sharing this)

    def workers(self, role: str) -> list[WorkerInfo]:
        if role == "router":  # what each replica's heartbeat says: its admitted requests
            return [
                WorkerInfo(rid, "router", rid, "n", load={"running": r.num_inflight})
                for rid, r in self.routers.items()
            ]
        return [w for w in self.infos if w.role == role]

    def prefixes(self, keys) -> list[NodePrefix]:
        return []


class FakeDecode:
    """``die_after`` / ``stall_after``: chunks sent before failing (None: never);
    ``refuse``: a Failure raised before the first chunk; ``recompute_s``: how long an
    overlapped call whose prefill failed takes to prefill the prompt itself; ``follow``: how an
    overlapped call learns its prefill's outcome (FakeClients wires its prefill workers')."""

    def __init__(self, follow: Callable[[DecodeCall], Awaitable[bool]] | None = None) -> None:
        self.follow = follow
        self.calls: list[DecodeCall] = []
        self.die_after: int | None = None
        self.stall_after: int | None = None
        self.refuse: Failure | None = None
        self.recompute_s = 0.5
        self.recomputed: list[str] = []  # overlapped calls that prefilled the prompt themselves

    async def stream(self, call: DecodeCall) -> AsyncIterator[WorkerChunk]:
        self.calls.append(call)
        if self.refuse is not None:
            raise WorkerCallError(self.refuse, f"{self.refuse.value}: refused")
        following = call.prefill_address is not None and self.follow is not None
        if following and not await self.follow(call):  # the prefill failed: compute it here
            await asyncio.sleep(self.recompute_s)
            self.recomputed.append(call.request_id)
        params, start = call.params, len(call.resume_token_ids)
        for sent, pos in enumerate(range(start, params.max_tokens)):
            if sent == self.die_after:
                raise WorkerCallError(Failure.UNAVAILABLE, "UNAVAILABLE: connection reset")
            if sent == self.stall_after:
                await asyncio.sleep(3600)
            token = token_at(call.prompt_token_ids, pos)
            if pos == 0 and call.prefilled is not None:
                token = call.prefilled.first_token.token_id
            last = pos == params.max_tokens - 1
            logprobs = (SampledToken(token, -0.5, [(token, -0.5)]),) if params.logprobs else ()
            yield WorkerChunk(
                token_ids=(token,), text=f"<{token}>", logprobs=logprobs,
                finish_reason="length" if last else None,
                usage=Usage(len(call.prompt_token_ids), params.max_tokens - start, 0)
                if last else None,
            )  # fmt: skip
            await asyncio.sleep(0)


class FakePrefill:
    """``fail``: the Failure raised after ``compute_s`` (a worker dying mid-prefill)."""

    def __init__(self) -> None:
        self.calls: list[PrefillCall] = []
        self.fail: Failure | None = None
        self.compute_s = 0.0
        self._outcomes: dict[str, asyncio.Future[bool]] = {}

    def _outcome(self, request_id: str) -> asyncio.Future[bool]:
        loop = asyncio.get_running_loop()
        return self._outcomes.setdefault(request_id, loop.create_future())

    async def handoff(self, request_id: str) -> bool:
        """What a decode worker following this prefill learns: True once it is done, False
        when it failed (the Handoff stream broke)."""
        return await asyncio.shield(self._outcome(request_id))

    async def prefill(self, call: PrefillCall) -> Prefilled:
        self.calls.append(call)
        outcome = self._outcome(call.request_id)
        try:
            await asyncio.sleep(self.compute_s)
            if self.fail is not None:
                raise WorkerCallError(self.fail, f"{self.fail.value}: prefill worker gone")
        except BaseException:
            _settle(outcome, False)
            raise
        _settle(outcome, True)
        token = token_at(call.prompt_token_ids, 0)
        kv = KVSource((b"k" * 16,), "kvstore:1", "n")
        return Prefilled(SampledToken(token, None, None), kv, len(call.prompt_token_ids))


def _settle(outcome: asyncio.Future[bool], value: bool) -> None:
    if not outcome.done():
        outcome.set_result(value)


class FakeClients(WorkerClients):
    """Calls go to the fake worker whose id is the address."""

    def __init__(self, prefill: Sequence[str] = (), decode: Sequence[str] = ()) -> None:
        self.prefill_workers = {w: FakePrefill() for w in prefill}
        self.decode_workers = {w: FakeDecode(self._handoff) for w in decode}

    async def prefill(self, address: str, call: PrefillCall, timeout_s: float) -> Prefilled:
        return await self.prefill_workers[address].prefill(call)

    def decode(self, address: str, call: DecodeCall, timeout_s: float):
        return self.decode_workers[address].stream(call)

    async def _handoff(self, call: DecodeCall) -> bool:
        """An overlapped call follows its prefill first, as the real decode worker does."""
        return await self.prefill_workers[call.prefill_address].handoff(call.request_id)
