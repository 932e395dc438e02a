"""OpenAI-compatible HTTP API (aiohttp): /v1/completions, /v1/chat/completions, /v1/models.

Requests are validated by pydantic models in strict mode (a string where a number belongs
is a 400, not a silent conversion), turned into the same ``GenerateRequest`` the gRPC API
takes, and served by the same :class:`Router`. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; 429 carries ``Retry-After``. Every
response carries the route explanation: the ``x-pdserve-route`` header (compact JSON) and a
``pdserve_route`` field (non-streaming body, first streamed chunk).

Extensions beyond OpenAI's fields: ``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``, ``stop_token_ids``, ``cache_salt``; header ``x-pdserve-deadline-s``.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Any, Literal

from aiohttp import web
from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdserve._proto.pdserve.v1 import common_pb2, router_pb2
from pdserve.metrics import aiohttp_metrics_handler
from pdserve.telemetry import extract_context
from services.router.auth import TenantGate
from services.router.errors import InvalidRequest, RouterError
from services.router.router import Router
from services.router.tenants import ApiKeys, Tenant

_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_ERROR: "error",
}


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    cache_salt: str | None = None


class CompletionBody(_Sampling):
    prompt: str | list[int] | list[str]
    logprobs: int | None = None
    echo: bool = False


class _Part(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[_Part]


class ChatBody(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def error_response(exc: RouterError) -> web.Response:
    body = {
        "error": {
            "message": exc.message,
            "type": exc.error_type,
            "param": exc.param,
            "code": exc.code,
        }
    }
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
    return web.json_response(body, status=exc.http_status, headers=headers)


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    return f"{param}: {err['msg']}" if param else err["msg"], param


async def _parse(request: web.Request, model: type[BaseModel]) -> BaseModel:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = _validation_message(exc)
        raise InvalidRequest(message, param=param) from None


def _sampling(body: _Sampling, max_tokens: int | None, logprobs: int | None):
    if body.n != 1:
        raise InvalidRequest("only n=1 is supported", param="n")
    msg = common_pb2.SamplingParams(ignore_eos=body.ignore_eos)
    for name in (
        "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k",
        "min_p", "repetition_penalty",
    ):  # fmt: skip
        value = getattr(body, name)
        if value is not None:
            setattr(msg, name, value)
    if max_tokens is not None:
        if not -(2**31) <= max_tokens < 2**31:
            raise InvalidRequest(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        msg.max_tokens = max_tokens
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise InvalidRequest(f"seed must be in [0, 2**63), got {body.seed}", param="seed")
    if logprobs is not None:
        msg.logprobs = logprobs
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    msg.stop.extend(stop)
    msg.stop_token_ids.extend(body.stop_token_ids or [])
    return msg


def _completion_request(body: CompletionBody, request_id: str) -> router_pb2.GenerateRequest:
    if body.echo:
        raise InvalidRequest("echo is not supported", param="echo")
    req = router_pb2.GenerateRequest(
        request_id=request_id,
        sampling=_sampling(body, body.max_tokens, body.logprobs),
        model=body.model or "",
        cache_salt=body.cache_salt or "",
    )
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise InvalidRequest("only one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        if not prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        req.prompt_token_ids.ids.extend(prompt)
    return req


def _chat_request(body: ChatBody, request_id: str) -> router_pb2.GenerateRequest:
    logprobs = None
    if body.logprobs:
        logprobs = body.top_logprobs or 0
    elif body.top_logprobs is not None:
        raise InvalidRequest("top_logprobs requires logprobs=true", param="top_logprobs")
    max_tokens = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    req = router_pb2.GenerateRequest(
        request_id=request_id,
        sampling=_sampling(body, max_tokens, logprobs),
        model=body.model or "",
        cache_salt=body.cache_salt or "",
    )
    for m in body.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        req.chat.messages.add(role="system" if m.role == "developer" else m.role, content=content)
    return req


def route_dict(route: common_pb2.RouteExplanation) -> dict:
    return MessageToDict(
        route, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _usage(usage: common_pb2.Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class _Logprobs:
    """Builds OpenAI's logprobs objects (completions and chat flavors) from TokenLogprobs."""

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
            out["top_logprobs"].append({self.token(t.token_id): t.logprob for t in lp.top})
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
                    {"token": (t := self.token(a.token_id)), "logprob": a.logprob,
                     "bytes": list(t.encode())}
                    for a in lp.top
                ],
            })  # fmt: skip
        return {"content": content}


def _deadline(request: web.Request) -> float | None:
    raw = request.headers.get("x-pdserve-deadline-s")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"x-pdserve-deadline-s must be a number, got {raw!r}") from None
    if not value > 0:
        raise InvalidRequest("x-pdserve-deadline-s must be > 0")
    return value


class OpenAIHandlers:
    def __init__(self, router: Router, gate: TenantGate) -> None:
        self.router = router
        self.gate = gate
        self.logprobs = _Logprobs(router.model.tokenizer)

    async def models(self, request: web.Request) -> web.Response:
        self._auth(request)
        model = {"id": self.router.model.name, "object": "model", "created": 0,
                 "owned_by": "pdserve"}  # fmt: skip
        return web.json_response({"object": "list", "data": [model]})

    async def health(self, request: web.Request) -> web.Response:
        stats = self.router.stats()
        ok = stats["decode_workers"] > 0
        return web.json_response({"status": "ok" if ok else "degraded", **stats},
                                 status=200 if ok else 503)  # fmt: skip

    def _auth(self, request: web.Request) -> Tenant:
        return self.gate.authenticate(request.headers.get("Authorization"))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        tenant = self._auth(request)
        body = await _parse(request, CompletionBody)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        return await self._serve(request, tenant, body, _completion_request(body, rid), chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        tenant = self._auth(request)
        body = await _parse(request, ChatBody)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        return await self._serve(request, tenant, body, _chat_request(body, rid), chat=True)

    async def _serve(self, request, tenant, body, req, *, chat: bool) -> web.StreamResponse:
        # A caller's W3C traceparent header makes the request part of the caller's trace.
        caller = extract_context({k.lower(): v for k, v in request.headers.items()})
        stream = self.gate.generate(
            tenant, self.router, req, _deadline(request), trace_context=caller
        )
        async with contextlib.aclosing(stream):  # closed in this task, whatever happens
            return await self._respond(request, body, req, stream, chat=chat)

    async def _respond(self, request, body, req, stream, *, chat: bool) -> web.StreamResponse:
        try:
            first = await stream.__anext__()  # errors before the first token are plain HTTP
        except StopAsyncIteration:
            raise RouterError("the decode worker ended the stream without a token") from None
        route = route_dict(first.route)
        headers = {"x-pdserve-route": json.dumps(route, separators=(",", ":"))}
        meta = {"id": req.request_id, "created": int(time.time()),
                "model": self.router.model.name}  # fmt: skip
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return await self._stream(request, stream, first, route, headers, meta, chat,
                                      include_usage)  # fmt: skip
        return await self._collect(stream, first, route, headers, meta, chat)

    async def _collect(self, stream, first, route, headers, meta, chat) -> web.Response:
        text, logprobs, last = first.text, list(first.logprobs), first
        async for chunk in stream:
            text += chunk.text
            logprobs.extend(chunk.logprobs)
            last = chunk
        finish = _FINISH.get(last.finish_reason, "stop")
        want_logprobs = first.logprobs or logprobs
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": finish,
                      "logprobs": self.logprobs.chat(logprobs) if want_logprobs else None}  # fmt: skip
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish,
                      "logprobs": self.logprobs.completion(logprobs, 0) if want_logprobs else None}  # fmt: skip
            obj = "text_completion"
        out = {**meta, "object": obj, "choices": [choice], "usage": _usage(last.usage),
               "pdserve_route": route}  # fmt: skip
        return web.json_response(out, headers=headers)

    async def _stream(self, request, stream, first, route, headers, meta, chat, include_usage):
        response = web.StreamResponse(
            headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"

        async def send(payload: dict) -> None:
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())

        if chat:
            await send({**meta, "object": obj, "pdserve_route": route, "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""},
                 "finish_reason": None, "logprobs": None}]})  # fmt: skip
        offset, usage, chunk = 0, None, first
        try:
            while chunk is not None:
                finish = _FINISH.get(chunk.finish_reason)
                if chat:
                    choice = {"index": 0, "delta": {"content": chunk.text} if chunk.text else {},
                              "finish_reason": finish,
                              "logprobs": self.logprobs.chat(chunk.logprobs) if chunk.logprobs else None}  # fmt: skip
                else:
                    choice = {"index": 0, "text": chunk.text, "finish_reason": finish,
                              "logprobs": self.logprobs.completion(chunk.logprobs, offset)
                              if chunk.logprobs else None}  # fmt: skip
                    offset += len(chunk.text)
                payload = {**meta, "object": obj, "choices": [choice]}
                if chunk is first and not chat:
                    payload["pdserve_route"] = route
                await send(payload)
                if chunk.HasField("usage"):
                    usage = chunk.usage
                chunk = await anext(stream, None)
            if include_usage and usage is not None:
                await send({**meta, "object": obj, "choices": [], "usage": _usage(usage)})
        except RouterError as exc:  # headers are sent: report in-band, as OpenAI does
            await send({"error": {"message": exc.message, "type": exc.error_type,
                                  "param": exc.param, "code": exc.code}})  # fmt: skip
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except RouterError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status >= 400:
            err = RouterError(exc.reason)
            err.http_status, err.error_type = exc.status, "invalid_request_error"
            return error_response(err)
        raise


def make_app(router: Router, gate: TenantGate | None = None) -> web.Application:
    """``gate``: the router's tenants (default: no keys, every caller admitted)."""
    h = OpenAIHandlers(router, gate or TenantGate(ApiKeys()))
    app = web.Application(middlewares=[_errors], client_max_size=16 << 20)
    app.router.add_post("/v1/completions", h.completions)
    app.router.add_post("/v1/chat/completions", h.chat)
    app.router.add_get("/v1/models", h.models)
    app.router.add_get("/health", h.health)
    app.router.add_get("/metrics", aiohttp_metrics_handler)
    return app
