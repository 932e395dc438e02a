"""Per-request sampling settings: validated once when built, immutable afterwards.

Semantics (what each field does at sampling time) live in `pdserve.engine.sampler`;
ranges and the user-facing description live in the README's "Sampling parameters" section.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Integral, Real

MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20


def _type_name(value: object) -> str:
    return type(value).__name__


def _as_int(name: str, value: object, allowed: str) -> int:
    # bool is an Integral, but `max_tokens=True` is a bug, not a request for one token.
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an int {allowed}, got {value!r} ({_type_name(value)})")
    return int(value)


def _as_float(name: str, value: object, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number {allowed}, got {value!r} ({_type_name(value)})")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")
    return result


def _check_range(name: str, value: float, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _as_stop(value: object) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, Iterable):
        raise ValueError(f"stop must be a string or a list of strings, got {_type_name(value)}")
    stop = tuple(items)
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop must contain only non-empty strings, got {s!r}")
    return stop


def _as_token_ids(value: object) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"stop_token_ids must be a list of ints >= 0, got {_type_name(value)}")
    ids = tuple(_as_int("stop_token_ids", t, ">= 0") for t in value)
    for t in ids:
        _check_range("stop_token_ids", t, t >= 0, "a list of ints >= 0 (each)")
    return ids


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token and when to stop. See the README's "Sampling parameters" section for the ranges."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self._validate_numbers()
        self._validate_penalties()
        self._validate_rest()

    def _set(self, name: str, value: object) -> None:
        # Normalizing (list -> tuple, numpy int -> int) is part of construction, so it is
        # the one place a frozen dataclass writes to itself.
        object.__setattr__(self, name, value)

    def _validate_numbers(self) -> None:
        v = _as_int("max_tokens", self.max_tokens, ">= 1")
        _check_range("max_tokens", v, v >= 1, ">= 1")
        self._set("max_tokens", v)
        v = _as_float("temperature", self.temperature, ">= 0")
        _check_range("temperature", v, v >= 0.0, ">= 0 (0 means greedy)")
        self._set("temperature", v)
        v = _as_int("top_k", self.top_k, ">= 0")
        _check_range("top_k", v, v >= 0, ">= 0 (0 disables it)")
        self._set("top_k", v)
        v = _as_float("top_p", self.top_p, "in (0, 1]")
        _check_range("top_p", v, 0.0 < v <= 1.0, "in (0, 1]")
        self._set("top_p", v)
        v = _as_float("min_p", self.min_p, "in [0, 1]")
        _check_range("min_p", v, 0.0 <= v <= 1.0, "in [0, 1]")
        self._set("min_p", v)

    def _validate_penalties(self) -> None:
        v = _as_float("repetition_penalty", self.repetition_penalty, "> 0")
        _check_range("repetition_penalty", v, v > 0.0, "> 0 (1 disables it)")
        self._set("repetition_penalty", v)
        for name in ("presence_penalty", "frequency_penalty"):
            v = _as_float(name, getattr(self, name), "in [-2, 2]")
            _check_range(name, v, -2.0 <= v <= 2.0, "in [-2, 2]")
            self._set(name, v)

    def _validate_rest(self) -> None:
        if self.seed is not None:
            v = _as_int("seed", self.seed, f"in [0, {MAX_SEED}]")
            _check_range("seed", v, 0 <= v <= MAX_SEED, f"in [0, {MAX_SEED}] or None")
            self._set("seed", v)
        if self.logprobs is not None:
            v = _as_int("logprobs", self.logprobs, f"in [0, {MAX_LOGPROBS}]")
            _check_range("logprobs", v, 0 <= v <= MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}] or None")
            self._set("logprobs", v)
        self._set("stop", _as_stop(self.stop))
        self._set("stop_token_ids", _as_token_ids(self.stop_token_ids))
        for name in ("ignore_eos", "skip_special_tokens"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r} ({_type_name(value)})")

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax of the (penalized) logits."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
