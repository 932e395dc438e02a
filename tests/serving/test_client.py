"""Client SDK against an in-process fake Router service (no model, no workers)."""

from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
import pytest

from pdserve._proto.pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from pdserve.client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    build_request,
)


class FakeRouter(router_pb2_grpc.RouterServicer):
    """Fails the first ``fail_first`` calls with UNAVAILABLE, then streams three chunks."""

    def __init__(self) -> None:
        self.calls: list[router_pb2.GenerateRequest] = []
        self.metadata: list[dict] = []
        self.fail_first = 0
        self.fail_after_first_chunk = False
        self.abort_with: tuple[grpc.StatusCode, str, str | None] | None = None
        self.sleep_s = 0.0

    def Generate(self, request, context):
        self.calls.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if self.abort_with is not None:
            code, message, retry_after = self.abort_with
            if retry_after:
                context.set_trailing_metadata((("retry-after", retry_after),))
            context.abort(code, message)
        if len(self.calls) <= self.fail_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "worker down")
        route = common_pb2.RouteExplanation(decode_worker="d0", reason="why not", prompt_tokens=3)
        yield router_pb2.GenerateChunk(request_id="r1", text="Hel", token_ids=[1], route=route)
        if self.fail_after_first_chunk:
            context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker died")
        if self.sleep_s:
            import time

            time.sleep(self.sleep_s)
        yield router_pb2.GenerateChunk(request_id="r1", text="lo", token_ids=[2])
        yield router_pb2.GenerateChunk(
            request_id="r1", text="!", token_ids=[3], finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=3, cached_tokens=0),
        )  # fmt: skip

    def ListModels(self, request, context):
        return router_pb2.ListModelsResponse(models=["m"])


@pytest.fixture
def fake():
    servicer = FakeRouter()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.target = f"127.0.0.1:{port}"
    yield servicer
    server.stop(0)


def test_generate_collects_chunks(fake):
    with Client(fake.target, token="s3cret") as client:
        done = client.generate("hi", max_tokens=3, temperature=0.0, stop=["x"], seed=7)
        assert client.models() == ["m"]
    assert (done.text, done.token_ids, done.finish_reason) == ("Hello!", [1, 2, 3], "length")
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (3, 3)
    assert (done.route.decode_worker, done.route.reason) == ("d0", "why not")
    req = fake.calls[0]
    assert req.prompt == "hi" and req.sampling.max_tokens == 3 and list(req.sampling.stop) == ["x"]
    assert req.sampling.HasField("temperature") and req.sampling.seed == 7
    assert not req.sampling.HasField("top_p")
    assert fake.metadata[0]["authorization"] == "Bearer s3cret"


def test_retries_unavailable_before_first_token(fake):
    fake.fail_first = 2
    with Client(fake.target, retry_backoff_s=0.01) as client:
        assert client.generate("hi").text == "Hello!"
    assert len(fake.calls) == 3


def test_retries_are_bounded(fake):
    fake.fail_first = 10
    with (
        Client(fake.target, max_retries=1, retry_backoff_s=0.01) as client,
        pytest.raises(Unavailable, match="worker down"),
    ):
        client.generate("hi")
    assert len(fake.calls) == 2


def test_no_retry_after_first_token(fake):
    fake.fail_after_first_chunk = True
    with Client(fake.target, retry_backoff_s=0.01) as client:
        chunks = []
        with pytest.raises(Unavailable, match="decode worker died"):
            for chunk in client.stream("hi"):
                chunks.append(chunk)
    assert [c.text for c in chunks] == ["Hel"] and chunks[0].route.decode_worker == "d0"
    assert len(fake.calls) == 1


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
    ],
)
def test_typed_errors(fake, code, cls):
    fake.abort_with = (code, "nope", "3" if cls is ResourceExhausted else None)
    with Client(fake.target) as client, pytest.raises(cls, match="nope") as info:
        client.generate("hi")
    assert info.value.code == code.name
    assert info.value.retry_after_s == (3.0 if cls is ResourceExhausted else None)
    assert len(fake.calls) == 1  # only UNAVAILABLE is retried


def test_per_call_timeout(fake):
    fake.sleep_s = 1.0
    with Client(fake.target) as client, pytest.raises(DeadlineExceeded):
        client.generate("hi", timeout_s=0.3)


def test_async_client(fake):
    fake.fail_first = 1

    async def main():
        async with AsyncClient(fake.target, retry_backoff_s=0.01) as client:
            done = await client.generate(messages=[{"role": "user", "content": "hey"}])
            texts = [c.text async for c in client.stream([5, 6], max_tokens=2)]
            return done, texts, await client.models()

    done, texts, models = asyncio.run(main())
    assert done.text == "Hello!" and done.finish_reason == "length"
    assert texts == ["Hel", "lo", "!"] and models == ["m"]
    assert fake.calls[1].chat.messages[0].content == "hey"
    assert list(fake.calls[2].prompt_token_ids.ids) == [5, 6]


def test_build_request_rejects_bad_arguments():
    with pytest.raises(TypeError, match="unknown sampling parameter"):
        build_request("x", temprature=0.5)
    with pytest.raises(TypeError, match="exactly one"):
        build_request()
    with pytest.raises(TypeError, match="exactly one"):
        build_request("x", messages=[{"role": "user", "content": "y"}])
