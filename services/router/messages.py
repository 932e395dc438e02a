"""The router core's plain data: what the edges hand it, what it yields, what it sends workers.

Protobuf and JSON stay at the edges: server.py (gRPC) and openai_api.py (HTTP) turn their
requests into a :class:`GenerateInput` and the :class:`Chunk` stream back into their
messages; workers.py turns :class:`PrefillCall` / :class:`DecodeCall` into worker RPCs and
their replies into :class:`Prefilled` / :class:`WorkerChunk`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.sampler import SampledToken
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv.metadata import NodePrefix, WorkerInfo
from pdserve.wire import KVSource
from services.router import policy


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system | user | assistant
    content: str


@dataclass(frozen=True)
class GenerateInput:
    """One caller's request, validated for shape at its edge; exactly one input is set."""

    request_id: str = ""
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    model: str = ""
    cache_salt: str | None = None

    @property
    def operation(self) -> str:
        return "chat" if self.messages is not None else "text_completion"


@dataclass(frozen=True)
class ParsedRequest:
    """A tokenized request the router can route."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class CachedTokens:
    """Prompt tokens cached on one node, per tier."""

    node_id: str
    hbm: int = 0
    dram: int = 0
    ssd: int = 0


@dataclass(frozen=True)
class RouteExplanation:
    """Why the request went where it did (returned on every response's first chunk)."""

    prefill_worker: str
    decode_worker: str
    disaggregated: bool
    reason: str
    prompt_tokens: int
    uncached_tokens: int
    cached: tuple[CachedTokens, ...] = ()
    decode_score: float = 0.0
    prefill_score: float = 0.0
    prefill_attempts: int = 0
    predicted_local_ttft_s: float = 0.0  # the cost policy's predictions; 0: not compared
    predicted_remote_ttft_s: float = 0.0


@dataclass(frozen=True)
class Chunk:
    """What the router yields: new text and tokens; the last has finish_reason and usage."""

    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[SampledToken, ...] = ()
    finish_reason: str | None = None  # stop | length | abort | error
    usage: Usage | None = None
    route: RouteExplanation | None = None  # first chunk only


@dataclass(frozen=True)
class Route:
    """A routing decision and what acting on it needs."""

    plan: policy.RoutePlan
    decode: WorkerInfo
    prefill: WorkerInfo | None
    prefixes: tuple[NodePrefix, ...]
    scores: dict[str, dict[str, float]]  # role -> worker id -> score (for the trace)


# ---- worker calls ----


@dataclass(frozen=True)
class PrefillCall:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None


@dataclass(frozen=True)
class Prefilled:
    """A prefill worker's answer: the first token and where the prompt's KV blocks are."""

    first_token: SampledToken
    kv: KVSource | None
    num_computed_tokens: int
    trace: dict[str, str] = field(default_factory=dict)  # the prefill's span, for linking


@dataclass(frozen=True)
class DecodeCall:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None
    prefilled: Prefilled | None = None
    resume_token_ids: tuple[int, ...] = ()  # a migrated request: tokens already streamed
    kv: KVSource | None = None  # a migrated request: the prompt's blocks a prefill stored
    kv_fetch_timeout_s: float = 0.0  # 0: the worker's default
    prefill_address: str | None = None  # overlapped handoff: the prefill worker to follow


@dataclass(frozen=True)
class WorkerChunk:
    token_ids: tuple[int, ...]
    text: str = ""
    logprobs: tuple[SampledToken, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
