"""Property-based fuzzing of both router APIs (Hypothesis, derandomized, bounded): whatever
arrives, the answer is never a 5xx / INTERNAL / UNKNOWN, and the router still serves after.

Runs against the router of test_router_service.py (real gRPC and HTTP edges, fake workers).
The model's context is cut to 64 tokens for the run so accepted requests stay short.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.request

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve._proto.pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.serving.test_router_service import env, post, reset  # noqa: F401, F811 - fixtures

FUZZ = settings(
    max_examples=120, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)  # fmt: skip
SAMPLING_FIELDS = (
    "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options",
    "presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty",
    "ignore_eos", "stop_token_ids", "cache_salt", "logprobs", "top_logprobs", "echo", "model",
    "max_completion_tokens", "tools", "response_format", "logit_bias", "user", "best_of",
)  # fmt: skip
any_text = st.text(st.characters(codec=None), max_size=20)  # lone surrogates included
scalars = (
    st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70)
    | st.floats() | any_text | st.sampled_from([0, 1, 2, 16, 2**31 - 1, 2**31, -1, 0.5])
)  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(any_text, kids, max_size=3),
    max_leaves=8,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | json_values},
        optional={"content": any_text | json_values},
    ),
    max_size=3,
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "prompt": any_text | st.lists(st.integers(-5, 2**32), max_size=5) | json_values,
        "messages": messages | json_values,
        **{name: json_values for name in SAMPLING_FIELDS},
    },
)


def _encode(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


@pytest.fixture
def short_context(env):  # noqa: F811
    router = env.router.router
    model = router.model
    router.model = dataclasses.replace(model, max_model_len=64)
    yield env
    router.model = model


def _still_serving(stack) -> None:
    status, _, body = post(stack, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 200 and body["choices"][0]["text"] == "t0 t1 "
    with urllib.request.urlopen(stack.http + "/health", timeout=10) as resp:
        assert resp.status == 200


def test_fuzzed_http_bodies_never_get_a_5xx(short_context):
    stack = short_context
    started = time.monotonic()

    @FUZZ
    @given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
           body=bodies | st.binary(max_size=64) | json_values)  # fmt: skip
    def check(path, body):
        status, _, reply = post(stack, path, _encode(body))
        assert status < 500, (status, reply)

    check()
    assert time.monotonic() - started < 240
    _still_serving(stack)


sampling = st.builds(
    common_pb2.SamplingParams,
    max_tokens=st.integers(-(2**31), 2**31 - 1) | st.integers(1, 8),
    temperature=st.floats(width=32), top_p=st.floats(width=32),
    top_k=st.integers(-(2**31), 2**31 - 1), min_p=st.floats(width=32),
    repetition_penalty=st.floats(width=32), presence_penalty=st.floats(width=32),
    frequency_penalty=st.floats(width=32), seed=st.integers(-(2**63), 2**63 - 1),
    stop=st.lists(st.text(max_size=300), max_size=20),
    stop_token_ids=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=5),
    ignore_eos=st.booleans(), logprobs=st.integers(-(2**31), 2**31 - 1),
)  # fmt: skip
chat = st.builds(
    router_pb2.ChatMessages,
    messages=st.lists(
        st.builds(router_pb2.ChatMessage, role=st.text(max_size=10), content=st.text()),
        max_size=3,
    ),
)
requests = st.builds(
    router_pb2.GenerateRequest,
    request_id=st.text(max_size=300), model=st.text(max_size=300),
    cache_salt=st.text(max_size=300), sampling=sampling,
    prompt=st.text(max_size=50),
) | st.builds(router_pb2.GenerateRequest, chat=chat, sampling=st.none() | sampling) | st.builds(
    router_pb2.GenerateRequest,
    prompt_token_ids=st.builds(
        router_pb2.TokenIds, ids=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8)
    ),
    sampling=st.none() | sampling,
)  # fmt: skip
ANSWERED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}  # fmt: skip


def test_fuzzed_grpc_requests_never_get_internal(short_context):
    stack = short_context
    channel = grpc.insecure_channel(stack.grpc)
    stub = router_pb2_grpc.RouterStub(channel)

    @FUZZ
    @given(request=requests)
    def check(request):
        try:
            list(stub.Generate(request, timeout=20))
        except grpc.RpcError as exc:
            assert exc.code() in ANSWERED, (exc.code(), exc.details())
            assert len(exc.details() or "") < 600

    try:
        check()
    finally:
        channel.close()
    _still_serving(stack)
