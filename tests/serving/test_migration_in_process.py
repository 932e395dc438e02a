"""Migration on real workers, token for token: the router's core with its real gRPC worker
clients drives the in-process kvstore, prefill and two decode workers (tests/serving/
conftest.py, the exact fp32 path). The first decode worker's stream is cut mid-way at the
client (as a dying worker's would be; the call is cancelled, so the worker aborts it); the
request moves to the second decode worker, which fetches the prompt's blocks the prefill
stored and replays the streamed tokens. The client's tokens must equal the offline engine's.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import Failure, WorkerCallError
from pdserve.kv.metadata import WorkerInfo
from pdserve.model.quant import resolve_quantization, variant_fingerprint
from services.router.messages import GenerateInput
from services.router.router import ModelInfo, Router
from services.router.settings import RouterSettings
from services.router.workers import GrpcWorkerClients
from tests.serving.conftest import PASSAGE
from tests.serving.router_fakes import FakeDirectory

NUM_TOKENS = 16
CUT_AFTER = 5  # chunks the first decode worker delivers


class CutFirstDecode(GrpcWorkerClients):
    """The real clients; the first decode stream fails after CUT_AFTER chunks."""

    def __init__(self) -> None:
        super().__init__(16 << 20)
        self.decode_calls: list = []

    async def decode(self, address, call, timeout_s):
        self.decode_calls.append((address, call))
        cut = len(self.decode_calls) == 1
        stream = super().decode(address, call, timeout_s)
        async with contextlib.aclosing(stream):
            sent = 0
            async for chunk in stream:
                if cut and sent == CUT_AFTER:
                    raise WorkerCallError(Failure.UNAVAILABLE, "UNAVAILABLE: connection reset")
                sent += 1
                yield chunk


@pytest.fixture(scope="module")
def second_decode(make_decode):
    return make_decode()


def _router(checkpoint, prefill, decodes, overlap: bool) -> tuple[Router, CutFirstDecode]:
    directory = FakeDirectory()
    directory.infos = [WorkerInfo("p0", "prefill", prefill.address, "localhost")]
    directory.infos += [
        WorkerInfo(f"d{i}", "decode", d.address, "localhost") for i, d in enumerate(decodes)
    ]
    settings = RouterSettings(
        disagg_threshold_tokens=32, disaggregation_policy="threshold", overlap_handoff=overlap,
        quantization="none", http_port=0, decode_stall_timeout_s=60,
    )  # fmt: skip
    mode = resolve_quantization("none", torch.device("cpu"))
    model = ModelInfo("m", checkpoint.tokenizer, variant_fingerprint(checkpoint.fingerprint, mode),
                      checkpoint.config.vocab_size, 2048)  # fmt: skip
    clients = CutFirstDecode()
    return Router(settings, model, directory, clients), clients


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
def test_a_migrated_stream_fetches_the_stored_prompt_and_equals_the_offline_engine(
    overlap, checkpoint, oracle, prefill, decode, second_decode
):
    prompt = f"Migration {int(overlap)}. {PASSAGE}"
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    router, clients = _router(checkpoint, prefill, [decode, second_decode], overlap)

    async def collect():
        async with contextlib.aclosing(
            router.generate(GenerateInput(prompt=prompt, params=params))
        ) as s:
            chunks = [chunk async for chunk in s]
        await clients.close()
        return chunks

    chunks = asyncio.run(collect())
    tokens = [t for c in chunks for t in c.token_ids]
    ids = oracle.tokenizer.encode(prompt)
    assert tokens == oracle.generate([ids], params)[0].token_ids
    assert chunks[0].route.disaggregated and chunks[-1].usage.completion_tokens == NUM_TOKENS
    (first_address, _), (moved_address, moved) = clients.decode_calls
    assert moved_address != first_address
    assert moved.kv is not None and len(moved.kv.block_keys) == len(ids) // 16
    resumed = moved.resume_token_ids  # the streamed tokens (a chunk may carry several)
    assert len(resumed) >= CUT_AFTER and resumed == tuple(tokens[: len(resumed)])
