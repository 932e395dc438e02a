"""Conversions between the wire contract (``pdserve.v1`` messages) and the engine's types.

Every service converts at its edge with these functions and nowhere else. Bad values raise
``ValueError`` with a message naming the field; servers map it once to gRPC
``INVALID_ARGUMENT`` (HTTP 400 in the router).

Conventions:
- An unset optional field takes the engine default (``SamplingParams()``).
- proto ``float`` is 32-bit: values are rounded to 7 significant digits on the way in, so
  ``top_p=0.9`` arrives as ``0.9`` rather than ``0.8999999761581421``.
- Finish reasons travel as the enum ``pdserve.v1.FinishReason``; the engine speaks the string
  values of :class:`pdserve.engine.sequence.FinishReason` (``"stop"``, ``"length"``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve._proto.pdserve.v1 import common_pb2
from pdserve.engine.sampler import SampledToken
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sequence import FinishReason

BLOCK_KEY_BYTES = 16
_FLOAT_FIELDS = (
    "temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
)  # fmt: skip
_INT_FIELDS = ("max_tokens", "top_k", "seed", "logprobs")

_REASON_TO_PROTO = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}
_REASON_FROM_PROTO = {v: k for k, v in _REASON_TO_PROTO.items()}


def _f32(value: float) -> float:
    return float(f"{value:.7g}")


# ---- sampling parameters ----


def sampling_from_proto(msg: common_pb2.SamplingParams | None) -> SamplingParams:
    """Engine sampling parameters from the wire; ValueError on any out-of-range field."""
    if msg is None:
        return SamplingParams()
    kwargs: dict = {}
    for name in _FLOAT_FIELDS:
        if msg.HasField(name):
            kwargs[name] = _f32(getattr(msg, name))
    for name in _INT_FIELDS:
        if msg.HasField(name):
            kwargs[name] = int(getattr(msg, name))
    if msg.HasField("skip_special_tokens"):
        kwargs["skip_special_tokens"] = msg.skip_special_tokens
    return SamplingParams(
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        **kwargs,
    )


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    """Every field set explicitly, so the far side needs no knowledge of our defaults."""
    msg = common_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        skip_special_tokens=params.skip_special_tokens,
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


# ---- finish reason ----


def finish_reason_to_proto(reason: str | FinishReason | None) -> int:
    """``None`` (not finished) → FINISH_REASON_UNSPECIFIED."""
    if reason is None:
        return common_pb2.FINISH_REASON_UNSPECIFIED
    try:
        return _REASON_TO_PROTO[FinishReason(reason)]
    except ValueError:
        raise ValueError(f"unknown finish reason {reason!r}") from None


def finish_reason_from_proto(value: int) -> FinishReason | None:
    if value == common_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    try:
        return _REASON_FROM_PROTO[value]
    except KeyError:
        raise ValueError(f"unknown finish_reason {value}") from None


# ---- logprobs ----


def logprob_to_proto(token: SampledToken) -> common_pb2.TokenLogprob:
    msg = common_pb2.TokenLogprob(token_id=token.token_id)
    if token.logprob is not None:
        msg.logprob = token.logprob
    for token_id, logprob in token.top_logprobs or ():
        msg.top.add(token_id=token_id, logprob=logprob)
    return msg


def sampled_token_from_proto(
    token_id: int, logprob: common_pb2.TokenLogprob | None = None, *, vocab_size: int | None = None
) -> SampledToken:
    """A token sampled elsewhere (the prefill worker's first token), with its logprobs if sent.

    Pass ``logprob=None`` when the message field is unset (``HasField`` false)."""
    if vocab_size is not None and not 0 <= token_id < vocab_size:
        raise ValueError(f"first_token_id must be in [0, {vocab_size}), got {token_id}")
    if logprob is None:
        return SampledToken(token_id, None, None)
    if logprob.token_id != token_id:
        raise ValueError(
            f"first_logprob is for token {logprob.token_id}, but first_token_id is {token_id}"
        )
    top = [(t.token_id, t.logprob) for t in logprob.top]
    return SampledToken(token_id, logprob.logprob, top)


# ---- usage ----


def usage_to_proto(
    num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int = 0
) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=num_completion_tokens,
        cached_tokens=num_cached_tokens,
    )


# ---- prompts and KV sources ----


def prompt_from_proto(token_ids: Sequence[int], vocab_size: int) -> list[int]:
    """Prompt token ids, checked to be non-empty and inside the vocabulary."""
    ids = list(token_ids)
    if not ids:
        raise ValueError("prompt_token_ids must not be empty")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {bad}")
    return ids


@dataclass(frozen=True)
class KVSource:
    """Where a prompt's full KV blocks can be read (see ``pdserve.v1.KVSource``)."""

    block_keys: tuple[bytes, ...]
    kvstore_address: str
    node_id: str


def kv_source_from_proto(msg: common_pb2.KVSource | None) -> KVSource | None:
    """None when no source was sent (no keys and no address)."""
    if msg is None or (not msg.block_keys and not msg.kvstore_address):
        return None
    for i, key in enumerate(msg.block_keys):
        if len(key) != BLOCK_KEY_BYTES:
            raise ValueError(f"kv.block_keys[{i}] must be {BLOCK_KEY_BYTES} bytes, got {len(key)}")
    if msg.block_keys and not msg.kvstore_address:
        raise ValueError("kv.kvstore_address is required when kv.block_keys is set")
    return KVSource(tuple(bytes(k) for k in msg.block_keys), msg.kvstore_address, msg.node_id)


def kv_source_to_proto(source: KVSource) -> common_pb2.KVSource:
    return common_pb2.KVSource(
        block_keys=list(source.block_keys),
        kvstore_address=source.kvstore_address,
        node_id=source.node_id,
    )


def trace_from_proto(msg: common_pb2.TraceContext | None) -> dict[str, str]:
    return dict(msg.entries) if msg is not None else {}


def trace_to_proto(entries: dict[str, str] | None) -> common_pb2.TraceContext:
    return common_pb2.TraceContext(entries=dict(entries or {}))
