"""``pdserve bench``: replay a workload against a running stack, open loop, and measure.

Each request is sent at its arrival time whatever the state of the others (open loop), with
a synthetic prompt of its length (token ids drawn from a seeded generator; a prefix group's
requests share their first ``prefix_tokens`` ids), greedy decoding and EOS ignored, so every
request produces exactly ``num_decode_tokens`` tokens. Timing matches the simulator's: TTFT is
arrival to the first chunk; a chunk of k tokens arriving d seconds after the previous one
counts k inter-token gaps of d / k (the first chunk counts none); TPOT is
(e2e - TTFT) / (tokens - 1).

Stopping early (Ctrl-C, or ``stop`` set): requests in flight are cancelled and recorded as
interrupted with what they received, requests not yet sent are left out, and the result is
still returned (and written by the CLI).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from pdserve.workload import result
from pdserve.workload.format import Request

INTERRUPTED = "interrupted"


class Target(Protocol):
    """Where requests go: yields, per streamed chunk, the number of tokens and the route."""

    def stream(self, prompt_ids: list[int], max_tokens: int) -> AsyncIterator[tuple[int, str]]: ...

    async def close(self) -> None: ...


class GrpcTarget:
    def __init__(self, address: str, timeout_s: float) -> None:
        from pdserve.client import AsyncClient

        self._client = AsyncClient(address, timeout_s=timeout_s)

    async def stream(self, prompt_ids: list[int], max_tokens: int):
        async for chunk in self._client.stream(
            prompt_ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True
        ):
            route = ""
            if chunk.route is not None:
                route = "disaggregated" if chunk.route.disaggregated else "local"
            yield len(chunk.token_ids), route

    async def close(self) -> None:
        await self._client.close()


class HttpTarget:
    """The router's OpenAI-compatible ``/v1/completions``, streamed (server-sent events)."""

    def __init__(self, base_url: str, timeout_s: float, model: str = "") -> None:
        import aiohttp

        self._url = base_url.rstrip("/") + "/v1/completions"
        self._model = model
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def stream(self, prompt_ids: list[int], max_tokens: int):
        # logprobs=0 makes every event list its tokens, so multi-token chunks count right.
        body = {"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "logprobs": 0}  # fmt: skip
        if self._model:
            body["model"] = self._model
        async with self._session.post(self._url, json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                n = sum(len((c.get("logprobs") or {}).get("tokens") or ())
                        for c in json.loads(line[5:]).get("choices", []))  # fmt: skip
                if n:
                    yield n, ""

    async def close(self) -> None:
        await self._session.close()


def target_for(url: str, timeout_s: float) -> Target:
    if url.startswith(("http://", "https://")):
        return HttpTarget(url, timeout_s)
    return GrpcTarget(url.removeprefix("grpc://"), timeout_s)


def prompt_ids(index: int, req: Request, seed: int, vocab_size: int) -> list[int]:
    low = 100  # keep clear of special tokens at the bottom of the vocabulary
    own = random.Random(f"{seed}:{index}")
    ids = [
        own.randrange(low, vocab_size) for _ in range(req.num_prefill_tokens - req.prefix_tokens)
    ]
    if not req.prefix_tokens:
        return ids
    group = random.Random(f"{seed}:group:{req.prefix_group}")
    return [group.randrange(low, vocab_size) for _ in range(req.prefix_tokens)] + ids


class _Collector:
    def __init__(self, workload: list[Request]) -> None:
        self.records: dict[int, result.RequestRecord] = {}
        self.gaps: list[float] = []
        self.weights: list[int] = []
        self.workload = workload

    async def one(self, index: int, target: Target, start: float, prompt: list[int]) -> None:
        req = self.workload[index]
        await asyncio.sleep(max(0.0, start + req.arrived_at_s - time.perf_counter()))
        record = result.RequestRecord(index, req.arrived_at_s, req.num_prefill_tokens, 0)
        self.records[index] = record
        sent = last = time.perf_counter()
        ttft = None
        try:
            async for num_tokens, route in target.stream(prompt, req.num_decode_tokens):
                now = time.perf_counter()
                record.route = record.route or route
                if num_tokens == 0:
                    continue
                if ttft is None:
                    ttft = now - sent
                else:
                    self.gaps.append((now - last) / num_tokens)
                    self.weights.append(num_tokens)
                record.num_output_tokens += num_tokens
                last = now
        except asyncio.CancelledError:
            record.error = INTERRUPTED
            record.ttft_s = ttft
            raise
        except Exception as exc:  # a failed request is a result: it misses the SLO
            record.error = f"{type(exc).__name__}: {exc}"
            record.ttft_s = ttft
            return
        if ttft is None:
            record.error = "no tokens received"
            return
        record.finish(ttft, time.perf_counter() - sent, record.num_output_tokens)


async def replay(
    workload: list[Request],
    target: Target,
    *,
    seed: int = 0,
    vocab_size: int = 49152,
    stop: asyncio.Event | None = None,
    on_done: Callable[[], None] | None = None,
) -> tuple[list[result.RequestRecord], list[float], list[int]]:
    """Send every request at its arrival time; returns (records, ITL gaps, gap weights)."""
    collector = _Collector(workload)
    prompts = [prompt_ids(i, r, seed, vocab_size) for i, r in enumerate(workload)]
    start = time.perf_counter() - workload[0].arrived_at_s
    tasks = [asyncio.create_task(collector.one(i, target, start, p)) for i, p in enumerate(prompts)]
    if on_done is not None:
        for task in tasks:
            task.add_done_callback(lambda _t: on_done())
    stopper = asyncio.create_task((stop or asyncio.Event()).wait())
    pending = asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.wait([pending, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    records = [collector.records[i] for i in sorted(collector.records)]
    return records, collector.gaps, collector.weights
