"""The pdserve client SDK: ``Client`` (blocking) and ``AsyncClient`` (asyncio) over gRPC.

    from pdserve.client import Client

    with Client("127.0.0.1:50051") as client:
        done = client.generate(messages=[{"role": "user", "content": "Hi!"}], max_tokens=32)
        print(done.text, done.route.decode_worker)
        for chunk in client.stream("Once upon a time", max_tokens=32, temperature=0):
            print(chunk.text, end="")

Each call takes an optional ``timeout_s`` (the call's gRPC deadline; the router also uses
it for admission). A call that fails with UNAVAILABLE *before the first token* is retried
up to ``max_retries`` times with exponential back-off within the same deadline; after the
first token nothing is retried (it could duplicate output). Failures raise a
:class:`PdserveError` subclass per gRPC status (``InvalidArgument``, ``ResourceExhausted``
with ``retry_after_s``, ``Unavailable``, ...). TLS: ``tls=True`` (system roots) or
``root_certificates=<PEM bytes>``; ``token`` sends ``authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from pdserve._proto.pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc

__all__ = [
    "AsyncClient", "Chunk", "Client", "Completion", "Route", "Usage", "PdserveError",
    "InvalidArgument", "NotFound", "ResourceExhausted", "Unavailable", "DeadlineExceeded",
    "Unauthenticated", "PermissionDenied", "Cancelled", "InternalError",
]  # fmt: skip

# ---- errors ----


class PdserveError(Exception):
    """A failed call. ``code`` is the gRPC status name; ``retry_after_s`` is set on overload."""

    code = "UNKNOWN"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidArgument(PdserveError):
    code = "INVALID_ARGUMENT"


class NotFound(PdserveError):
    code = "NOT_FOUND"


class ResourceExhausted(PdserveError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(PdserveError):
    code = "UNAVAILABLE"


class DeadlineExceeded(PdserveError):
    code = "DEADLINE_EXCEEDED"


class Unauthenticated(PdserveError):
    code = "UNAUTHENTICATED"


class PermissionDenied(PdserveError):
    code = "PERMISSION_DENIED"


class Cancelled(PdserveError):
    code = "CANCELLED"


class InternalError(PdserveError):
    code = "INTERNAL"


_ERRORS = {cls.code: cls for cls in PdserveError.__subclasses__()}


def _error(exc: grpc.RpcError) -> PdserveError:
    code = exc.code()
    name = code.name if code is not None else "UNKNOWN"
    retry_after = None
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after":
            retry_after = float(value)
    cls = _ERRORS.get(name, PdserveError)
    err = cls(exc.details() or name, retry_after_s=retry_after)
    if cls is PdserveError:
        err.code = name
    return err


# ---- results ----


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class Route:
    """Why the router sent the request where it did (``pdserve.v1.RouteExplanation``)."""

    prefill_worker: str = ""
    decode_worker: str = ""
    disaggregated: bool = False
    reason: str = ""
    prompt_tokens: int = 0
    uncached_tokens: int = 0
    cached: dict[str, dict[str, int]] = field(default_factory=dict)  # node -> tier -> tokens
    decode_score: float = 0.0
    prefill_score: float = 0.0
    prefill_attempts: int = 0
    predicted_local_ttft_s: float = 0.0  # the router's cost policy; 0: it did not compare
    predicted_remote_ttft_s: float = 0.0

    @classmethod
    def from_proto(cls, msg: common_pb2.RouteExplanation) -> Route:
        cached = {c.node_id: {"hbm": c.hbm, "dram": c.dram, "ssd": c.ssd} for c in msg.cached}
        return cls(
            msg.prefill_worker, msg.decode_worker, msg.disaggregated, msg.reason,
            msg.prompt_tokens, msg.uncached_tokens, cached, msg.decode_score,
            msg.prefill_score, msg.prefill_attempts, msg.predicted_local_ttft_s,
            msg.predicted_remote_ttft_s,
        )  # fmt: skip


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_ERROR: "error",
}


@dataclass(frozen=True)
class Chunk:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # set on the last chunk
    usage: Usage | None = None  # set on the last chunk
    route: Route | None = None  # set on the first chunk

    @classmethod
    def from_proto(cls, msg: router_pb2.GenerateChunk) -> Chunk:
        logprobs = tuple(
            TokenLogprob(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
            for lp in msg.logprobs
        )
        usage = route = None
        if msg.HasField("usage"):
            u = msg.usage
            usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
        if msg.HasField("route"):
            route = Route.from_proto(msg.route)
        return cls(msg.request_id, msg.text, tuple(msg.token_ids), logprobs,
                   _FINISH.get(msg.finish_reason), usage, route)  # fmt: skip


@dataclass
class Completion:
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    route: Route = field(default_factory=Route)

    def add(self, chunk: Chunk) -> None:
        self.request_id = chunk.request_id
        self.text += chunk.text
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        if chunk.route is not None:
            self.route = chunk.route
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason


# ---- requests ----

_SAMPLING = {
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed", "logprobs", "skip_special_tokens",
    "ignore_eos",
}  # fmt: skip


def build_request(
    prompt: str | Sequence[int] | None = None,
    *,
    messages: Sequence[dict[str, str]] | None = None,
    model: str = "",
    cache_salt: str = "",
    request_id: str = "",
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] = (),
    **sampling: Any,
) -> router_pb2.GenerateRequest:
    """A ``GenerateRequest`` from a prompt (text or token ids) or chat ``messages``."""
    unknown = set(sampling) - _SAMPLING
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    if (prompt is None) == (messages is None):
        raise TypeError("give exactly one of prompt or messages")
    params = common_pb2.SamplingParams(
        **{k: v for k, v in sampling.items() if v is not None},
        stop=[stop] if isinstance(stop, str) else list(stop or ()),
        stop_token_ids=list(stop_token_ids),
    )
    req = router_pb2.GenerateRequest(
        request_id=request_id, sampling=params, model=model, cache_salt=cache_salt
    )
    if messages is not None:
        for m in messages:
            req.chat.messages.add(role=m["role"], content=m["content"])
    elif isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.ids.extend(prompt)
    return req


class _Base:
    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        token: str | None = None,
        timeout_s: float | None = 120.0,
        max_retries: int = 2,
        retry_backoff_s: float = 0.25,
        max_message_bytes: int = 16 << 20,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.target = target
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._credentials = (
            grpc.ssl_channel_credentials(root_certificates)
            if tls or root_certificates is not None
            else None
        )

    def _deadline(self, timeout_s: float | None) -> float | None:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        return None if timeout is None else time.monotonic() + timeout

    def _retry_delay(
        self, attempt: int, deadline: float | None, exc: grpc.RpcError
    ) -> float | None:
        """Seconds to wait before retrying, or None to give up."""
        if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.max_retries:
            return None
        delay = self.retry_backoff_s * (2**attempt)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        if deadline is None:
            return None
        return max(0.001, deadline - time.monotonic())


class Client(_Base):
    """Blocking client. Thread-safe; reuse one per process."""

    def __init__(self, target: str = "127.0.0.1:50051", **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        if self._credentials is not None:
            self._channel = grpc.secure_channel(target, self._credentials, options=self._options)
        else:
            self._channel = grpc.insecure_channel(target, options=self._options)
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    def stream(
        self, prompt=None, *, timeout_s: float | None = None, **kwargs: Any
    ) -> Iterator[Chunk]:
        """Yield chunks as tokens are produced. Closing the iterator cancels the request."""
        request = build_request(prompt, **kwargs)
        deadline = self._deadline(timeout_s)
        attempt = 0
        while True:
            call = self._stub.Generate(
                request, timeout=self._remaining(deadline), metadata=self._metadata
            )
            started = False
            try:
                for msg in call:
                    started = True
                    yield Chunk.from_proto(msg)
                return
            except grpc.RpcError as exc:
                delay = None if started else self._retry_delay(attempt, deadline, exc)
                if delay is None:
                    raise _error(exc) from None
            finally:
                call.cancel()
            attempt += 1
            time.sleep(delay)

    def generate(self, prompt=None, *, timeout_s: float | None = None, **kwargs: Any) -> Completion:
        """The whole completion at once."""
        done = Completion()
        for chunk in self.stream(prompt, timeout_s=timeout_s, **kwargs):
            done.add(chunk)
        return done

    def models(self, *, timeout_s: float | None = None) -> list[str]:
        try:
            reply = self._stub.ListModels(
                router_pb2.ListModelsRequest(),
                timeout=self._remaining(self._deadline(timeout_s)),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return list(reply.models)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client; create and use it inside one event loop."""

    def __init__(self, target: str = "127.0.0.1:50051", **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        if self._credentials is not None:
            self._channel = grpc.aio.secure_channel(
                target, self._credentials, options=self._options
            )
        else:
            self._channel = grpc.aio.insecure_channel(target, options=self._options)
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    async def stream(
        self, prompt=None, *, timeout_s: float | None = None, **kwargs: Any
    ) -> AsyncIterator[Chunk]:
        request = build_request(prompt, **kwargs)
        deadline = self._deadline(timeout_s)
        attempt = 0
        while True:
            call = self._stub.Generate(
                request, timeout=self._remaining(deadline), metadata=self._metadata
            )
            started = False
            try:
                async for msg in call:
                    started = True
                    yield Chunk.from_proto(msg)
                return
            except grpc.RpcError as exc:
                delay = None if started else self._retry_delay(attempt, deadline, exc)
                if delay is None:
                    raise _error(exc) from None
            finally:
                call.cancel()
            attempt += 1
            await asyncio.sleep(delay)

    async def generate(
        self, prompt=None, *, timeout_s: float | None = None, **kwargs: Any
    ) -> Completion:
        done = Completion()
        async for chunk in self.stream(prompt, timeout_s=timeout_s, **kwargs):
            done.add(chunk)
        return done

    async def models(self, *, timeout_s: float | None = None) -> list[str]:
        try:
            reply = await self._stub.ListModels(
                router_pb2.ListModelsRequest(),
                timeout=self._remaining(self._deadline(timeout_s)),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return list(reply.models)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
