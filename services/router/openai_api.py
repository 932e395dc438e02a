"""OpenAI-compatible HTTP API (aiohttp): /v1/completions, /v1/chat/completions, /v1/models.

The HTTP edge. A body is read under ``max_request_bytes``, parsed as strict UTF-8 JSON with
bounded integer literals and nesting (``max_json_depth``), with no lone surrogates, then
validated by pydantic models in strict mode (a string where a number belongs is a 400, not a
silent conversion; integers are range-checked to the wire's int32/int64, floats to its
float32). Every failure is a
4xx naming the field, whose message never echoes the caller's unbounded input. OpenAI
fields pdserve does not implement (``tools``, ``response_format``, ``logit_bias``, ...) are
refused with a 400 naming the field rather than silently ignored. The body becomes a
:class:`GenerateInput` for the same :class:`Router` the gRPC API serves; errors are mapped
once here (``pdserve.errors.http_status``) to OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; 429 carries ``Retry-After``.

Streaming (``stream: true``): refusals before admission (400, 429, 503) are plain HTTP
errors; once the router admits the request the SSE headers go out at once, and an SSE
comment (``: keep-alive``) every ``SSE_KEEPALIVE_S`` while no token has come, so a client
never waits without a byte. A failure after that is an in-band ``{"error": ...}`` event
followed by ``[DONE]``.

Not streaming: the response is sent whole, with its real status, when it is ready within
``SSE_KEEPALIVE_S`` of admission. Past that, its ``200`` headers go out and then a space
every ``SSE_KEEPALIVE_S`` (whitespace before a JSON value is valid JSON) until the body, so
no client waits without a byte either. The status is committed then: a failure after it is
the ``{"error": ...}`` object in that 200 body (clients that need the status of a long
request should stream). The ``x-pdserve-route`` header rides only on a response sent whole.

The route explanation: the ``x-pdserve-route`` header (compact JSON, non-streaming responses
sent whole) and a ``pdserve_route`` field (non-streaming body, first streamed chunk).

Extensions beyond OpenAI's fields: ``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``, ``stop_token_ids``, ``cache_salt``; header ``x-pdserve-deadline-s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import re
import struct
import time
import uuid
from collections.abc import Coroutine
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdserve.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from pdserve.errors import InvalidRequest, PdserveError, http_status, quoted
from pdserve.metrics import aiohttp_metrics_handler
from pdserve.telemetry import extract_context
from services.router.auth import TenantGate
from services.router.messages import ChatMessage, Chunk, GenerateInput, RouteExplanation, Usage
from services.router.router import MAX_ID_CHARS, MAX_STOP, MAX_STOP_TOKEN_IDS, Router
from services.router.tenants import ApiKeys, Tenant

SSE_KEEPALIVE_S = 5.0
MAX_INT_DIGITS = 40  # longer integer literals are refused before conversion
MAX_MESSAGES = 4096
_SURROGATE = re.compile("[\ud800-\udfff]")
_TYPE_TAG = re.compile(r"[\[\-]|^(str|int|float|bool|list|dict)$")

Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
# The wire's float fields are float32: a larger double would reach the workers as infinity.
FLOAT32_MAX = 3.4028234663852886e38
Float32 = Annotated[float, Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
Id = Annotated[str, Field(max_length=MAX_ID_CHARS)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]

# OpenAI fields pdserve does not implement; a request that sets one is refused (400).
_UNSUPPORTED = (
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
    "response_format", "logit_bias", "suffix", "audio", "modalities", "prediction",
    "web_search_options", "reasoning_effort", "best_of",
)  # fmt: skip
_HARMLESS = {"best_of": 1, "response_format": {"type": "text"}, "modalities": ["text"]}


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: Id | None = None
    max_tokens: Int32 | None = None
    temperature: Float32 | None = None
    top_p: Float32 | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    n: Int32 = 1
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    presence_penalty: Float32 | None = None
    frequency_penalty: Float32 | None = None
    user: Id | None = None
    top_k: Int32 | None = None
    min_p: Float32 | None = None
    repetition_penalty: Float32 | None = None
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[Count], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    cache_salt: Id | None = None


class CompletionBody(_Sampling):
    prompt: (
        str
        | Annotated[list[Count], Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1, max_length=1)]
    )
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False


class _Part(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | Annotated[list[_Part], Field(max_length=MAX_MESSAGES)]


class ChatBody(_Sampling):
    messages: Annotated[list[_Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Int32 | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


# ---- errors ----


def error_body(exc: PdserveError) -> dict:
    return {"error": {"message": exc.message, "type": http_status(exc)[1], "param": exc.param,
                      "code": exc.code}}  # fmt: skip


def error_response(exc: PdserveError) -> web.Response:
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
    return web.json_response(error_body(exc), status=http_status(exc)[0], headers=headers)


# ---- parsing ----


def _parse_int(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        raise InvalidRequest(f"an integer in the body has more than {MAX_INT_DIGITS} digits")
    return int(literal)


def _parse_constant(name: str) -> float:
    raise InvalidRequest(f"{name} is not valid JSON (numbers must be finite)")


def _check_tree(data: Any, max_depth: int) -> None:
    """Nesting depth and strings that are not valid Unicode (lone UTF-16 surrogates)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise InvalidRequest(f"the body is nested deeper than {max_depth} levels")
        if isinstance(value, dict):
            stack.extend((k, depth) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str) and _SURROGATE.search(value):
            raise InvalidRequest("a string in the body is not valid Unicode (lone surrogate)")


def parse_json_body(raw: bytes, max_depth: int) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("request body is not valid UTF-8") from None
    try:
        data = json.loads(text, parse_int=_parse_int, parse_constant=_parse_constant)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise InvalidRequest(f"the body is nested deeper than {max_depth} levels") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    _check_tree(data, max_depth)
    return data


def _check_unsupported(data: dict) -> None:
    for name in _UNSUPPORTED:
        value = data.get(name)
        if value in (None, [], {}) or value == _HARMLESS.get(name):
            continue
        raise InvalidRequest(f"{name} is not supported by pdserve", param=name)


def _validation_error(exc: ValidationError) -> InvalidRequest:
    """The most telling error: a value out of range beats "not of the union's other type"."""
    errors = exc.errors(include_url=False, include_input=False)
    err = next((e for e in errors if not e["type"].endswith("_type")), errors[0])
    # Union members appear in the location ("list[int]", "constrained-str"): not fields.
    parts = [str(p) for p in err["loc"] if not (isinstance(p, str) and _TYPE_TAG.search(p))]
    param = ".".join(parts) or None
    return InvalidRequest(f"{param}: {err['msg']}" if param else err["msg"], param=param)


async def _parse(request: web.Request, model: type[BaseModel], max_depth: int) -> BaseModel:
    data = parse_json_body(await request.read(), max_depth)
    _check_unsupported(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _float32(value: float) -> float:
    """``value`` rounded to the wire's float32 (within range: Float32 bounds it)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _params(body: _Sampling, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    if body.n != 1:
        raise InvalidRequest(f"only n=1 is supported, got {body.n}", param="n")
    fields: dict = {"ignore_eos": body.ignore_eos}
    for name in ("seed", "top_k"):
        value = getattr(body, name)
        if value is not None:
            fields[name] = value
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p",
                 "repetition_penalty"):  # fmt: skip
        value = getattr(body, name)
        if value is not None:  # checked as the workers will see it (a tiny top_p becomes 0)
            fields[name] = _float32(value)
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    if logprobs is not None:
        fields["logprobs"] = logprobs
    fields["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop or ()
    fields["stop_token_ids"] = body.stop_token_ids or ()
    try:
        return SamplingParams(**fields)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=str(exc).split(" ", 1)[0]) from None


def completion_input(body: CompletionBody, request_id: str) -> GenerateInput:
    if body.echo:
        raise InvalidRequest("echo is not supported", param="echo")
    common = dict(request_id=request_id, params=_params(body, body.max_tokens, body.logprobs),
                  model=body.model or "", cache_salt=body.cache_salt or None)  # fmt: skip
    prompt = body.prompt
    if isinstance(prompt, list) and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return GenerateInput(prompt=prompt, **common)
    return GenerateInput(prompt_token_ids=tuple(prompt), **common)


def chat_input(body: ChatBody, request_id: str) -> GenerateInput:
    logprobs = None
    if body.logprobs:
        logprobs = body.top_logprobs or 0
    elif body.top_logprobs is not None:
        raise InvalidRequest("top_logprobs requires logprobs=true", param="top_logprobs")
    max_tokens = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    messages = tuple(
        ChatMessage(
            "system" if m.role == "developer" else m.role,
            m.content if isinstance(m.content, str) else "".join(p.text for p in m.content),
        )
        for m in body.messages
    )
    return GenerateInput(
        request_id=request_id, messages=messages, params=_params(body, max_tokens, logprobs),
        model=body.model or "", cache_salt=body.cache_salt or None,
    )  # fmt: skip


def _deadline(request: web.Request) -> float | None:
    raw = request.headers.get("x-pdserve-deadline-s")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(
            f"x-pdserve-deadline-s must be a number, got {quoted(raw)}",
            param="x-pdserve-deadline-s",
        ) from None
    if not (value > 0 and math.isfinite(value)):
        raise InvalidRequest("x-pdserve-deadline-s must be > 0", param="x-pdserve-deadline-s")
    return value


# ---- responses ----


def route_dict(route: RouteExplanation) -> dict:
    return dataclasses.asdict(route)


def _usage(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class _Logprobs:
    """Builds OpenAI's logprobs objects (completions and chat flavors) from SampledTokens."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer

    def token(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)

    def completion(self, logprobs, text_offset: int) -> dict:
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in logprobs:
            tok = self.token(lp.token_id)
            out["tokens"].append(tok)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append({self.token(t): p for t, p in lp.top_logprobs or ()})
            out["text_offset"].append(text_offset)
            text_offset += len(tok)
        return out

    def chat(self, logprobs) -> dict:
        content = []
        for lp in logprobs:
            tok = self.token(lp.token_id)
            content.append({
                "token": tok,
                "logprob": lp.logprob,
                "bytes": list(tok.encode()),
                "top_logprobs": [
                    {"token": (t := self.token(a)), "logprob": p, "bytes": list(t.encode())}
                    for a, p in lp.top_logprobs or ()
                ],
            })  # fmt: skip
        return {"content": content}


def _keep_alive_task(keep_alive: Coroutine[Any, Any, None]) -> asyncio.Task:
    """Run a response's keep-alive loop beside the handler's task (the caller's): a write that
    finds the client gone cancels the handler, which closes the router's stream and so aborts
    the request on its workers (aiohttp does not cancel a handler whose client left)."""
    handler = asyncio.current_task()

    async def run() -> None:
        try:
            await keep_alive
        except ConnectionError:
            handler.cancel()

    return asyncio.create_task(run())


class _SSE:
    """One SSE response: headers sent when the router admits the request, then events, with
    a comment whenever nothing was written for ``SSE_KEEPALIVE_S``."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        self._keepalive: asyncio.Task | None = None
        self._last_write = time.monotonic()

    async def open(self) -> None:
        if not self.response.prepared:
            await self.response.prepare(self._request)
            self._keepalive = _keep_alive_task(self._keep_alive())

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(SSE_KEEPALIVE_S - (time.monotonic() - self._last_write))
            if time.monotonic() - self._last_write >= SSE_KEEPALIVE_S:
                await self._write(b": keep-alive\n\n")

    async def _write(self, data: bytes) -> None:
        self._last_write = time.monotonic()
        await self.response.write(data)

    async def send(self, payload: dict) -> None:
        await self.open()
        await self._write(f"data: {json.dumps(payload)}\n\n".encode())

    async def stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
            self._keepalive = None

    async def close(self) -> None:
        await self.stop_keepalive()
        if self.response.prepared:
            await self._write(b"data: [DONE]\n\n")
            await self.response.write_eof()


class _JSONBody:
    """One non-streaming response: whole when ready within ``SSE_KEEPALIVE_S`` of admission,
    else its 200 headers then, a space every ``SSE_KEEPALIVE_S``, and the body at the end."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response = web.StreamResponse(headers={"Content-Type": "application/json"})
        self._keepalive: asyncio.Task | None = None

    async def admitted(self) -> None:
        self._keepalive = _keep_alive_task(self._keep_alive())

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(SSE_KEEPALIVE_S)
            if not self.response.prepared:
                await self.response.prepare(self._request)
            await self.response.write(b" ")

    async def finish(self, payload: dict, status: int = 200, headers=None) -> web.StreamResponse:
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
        if not self.response.prepared:
            return web.json_response(payload, status=status, headers=headers)
        await self.response.write(json.dumps(payload).encode())
        await self.response.write_eof()
        return self.response


class OpenAIHandlers:
    def __init__(self, router: Router, gate: TenantGate) -> None:
        self.router = router
        self.gate = gate
        self.logprobs = _Logprobs(router.model.tokenizer)
        self.max_depth = router.settings.max_json_depth

    async def models(self, request: web.Request) -> web.Response:
        self._auth(request)
        model = {"id": self.router.model.name, "object": "model", "created": 0,
                 "owned_by": "pdserve"}  # fmt: skip
        return web.json_response({"object": "list", "data": [model]})

    async def health(self, request: web.Request) -> web.Response:
        """Readiness (also ``/ready``): 503 while no decode worker is in rotation."""
        stats = self.router.stats()
        ok = stats["decode_workers"] > 0
        return web.json_response({"status": "ok" if ok else "degraded", **stats},
                                 status=200 if ok else 503)  # fmt: skip

    async def live(self, request: web.Request) -> web.Response:
        """Liveness: the process answers, with or without workers."""
        return web.json_response({"status": "alive"})

    def _auth(self, request: web.Request) -> Tenant:
        return self.gate.authenticate(request.headers.get("Authorization"))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        tenant = self._auth(request)
        body = await _parse(request, CompletionBody, self.max_depth)
        inp = completion_input(body, f"cmpl-{uuid.uuid4().hex[:24]}")
        return await self._serve(request, tenant, body, inp, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        tenant = self._auth(request)
        body = await _parse(request, ChatBody, self.max_depth)
        inp = chat_input(body, f"chatcmpl-{uuid.uuid4().hex[:24]}")
        return await self._serve(request, tenant, body, inp, chat=True)

    async def _serve(self, request, tenant, body, inp, *, chat: bool) -> web.StreamResponse:
        # A caller's W3C traceparent header makes the request part of the caller's trace.
        caller = extract_context({k.lower(): v for k, v in request.headers.items()})
        meta = {"id": inp.request_id, "created": int(time.time()),
                "model": self.router.model.name}  # fmt: skip
        sse = _SSE(request) if body.stream else None
        whole = _JSONBody(request) if sse is None else None
        stream = self.gate.generate(
            tenant, self.router, inp, _deadline(request), trace_context=caller,
            on_admitted=sse.open if sse is not None else whole.admitted,
        )  # fmt: skip
        async with contextlib.aclosing(stream):  # closed in this task, whatever happens
            if whole is not None:
                return await self._collect(whole, stream, meta, chat)
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return await self._stream(sse, stream, meta, chat, include_usage)

    async def _collect(self, whole: _JSONBody, stream, meta, chat) -> web.StreamResponse:
        try:
            chunks = [chunk async for chunk in stream]
            if not chunks:
                raise PdserveError("the decode worker ended the stream without a token")
        except PdserveError as exc:
            status = http_status(exc)[0]
            headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
            return await whole.finish(error_body(exc), status, headers)
        first, last = chunks[0], chunks[-1]
        text = "".join(c.text for c in chunks)
        logprobs = [lp for c in chunks for lp in c.logprobs]
        finish = last.finish_reason or "stop"
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": finish,
                      "logprobs": self.logprobs.chat(logprobs) if logprobs else None}  # fmt: skip
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish,
                      "logprobs": self.logprobs.completion(logprobs, 0) if logprobs else None}  # fmt: skip
            obj = "text_completion"
        route = route_dict(first.route) if first.route is not None else None
        usage = _usage(last.usage) if last.usage is not None else None
        out = {**meta, "object": obj, "choices": [choice], "usage": usage,
               "pdserve_route": route}  # fmt: skip
        headers = {"x-pdserve-route": json.dumps(route, separators=(",", ":"))} if route else None
        return await whole.finish(out, headers=headers)

    def _choice(self, chunk: Chunk, chat: bool, offset: int) -> dict:
        if chat:
            return {"index": 0, "delta": {"content": chunk.text} if chunk.text else {},
                    "finish_reason": chunk.finish_reason,
                    "logprobs": self.logprobs.chat(chunk.logprobs) if chunk.logprobs else None}  # fmt: skip
        return {"index": 0, "text": chunk.text, "finish_reason": chunk.finish_reason,
                "logprobs": self.logprobs.completion(chunk.logprobs, offset)
                if chunk.logprobs else None}  # fmt: skip

    async def _stream(self, sse: _SSE, stream, meta, chat, include_usage):
        obj = "chat.completion.chunk" if chat else "text_completion"
        offset, usage = 0, None
        try:
            async for chunk in stream:
                payload = {**meta, "object": obj}
                if chunk.route is not None:
                    payload["pdserve_route"] = route_dict(chunk.route)
                    if chat:
                        await sse.send({**payload, "choices": [
                            {"index": 0, "delta": {"role": "assistant", "content": ""},
                             "finish_reason": None, "logprobs": None}]})  # fmt: skip
                        payload = {**meta, "object": obj}
                await sse.send({**payload, "choices": [self._choice(chunk, chat, offset)]})
                offset += len(chunk.text)
                usage = chunk.usage or usage
            if include_usage and usage is not None:
                await sse.send({**meta, "object": obj, "choices": [], "usage": _usage(usage)})
        except PdserveError as exc:
            if not sse.response.prepared:
                raise  # refused before admission: a plain HTTP error
            await sse.send(error_body(exc))  # headers are sent: report in-band, as OpenAI does
        finally:
            await sse.stop_keepalive()
        await sse.close()
        return sse.response


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except PdserveError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status >= 400:
            err = InvalidRequest(exc.reason)
            return web.json_response(error_body(err), status=exc.status)
        raise


def make_app(router: Router, gate: TenantGate | None = None) -> web.Application:
    """``gate``: the router's tenants (default: no keys, every caller admitted)."""
    h = OpenAIHandlers(router, gate or TenantGate(ApiKeys()))
    app = web.Application(middlewares=[_errors], client_max_size=router.settings.max_request_bytes)
    app.router.add_post("/v1/completions", h.completions)
    app.router.add_post("/v1/chat/completions", h.chat)
    app.router.add_get("/v1/models", h.models)
    app.router.add_get("/health", h.health)
    app.router.add_get("/ready", h.health)
    app.router.add_get("/live", h.live)
    app.router.add_get("/metrics", aiohttp_metrics_handler)
    return app
