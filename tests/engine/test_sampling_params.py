import dataclasses
import math

import pytest

from pdserve.engine.sampling_params import MAX_SEED, SamplingParams


def test_defaults():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (16, 1.0, 0, 1.0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.stop, p.stop_token_ids, p.logprobs) == (None, (), (), None)
    assert p.ignore_eos is False and p.skip_special_tokens is True
    assert not p.is_greedy and not p.has_penalties


def test_frozen_and_hashable():
    p = SamplingParams(stop=["a"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_tokens = 3  # type: ignore[misc]
    assert hash(p) == hash(SamplingParams(stop=("a",)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"max_tokens": "3"}, "max_tokens must be an int >= 1, got '3' (str)"),
        ({"max_tokens": True}, "max_tokens must be an int >= 1, got True (bool)"),
        ({"max_tokens": 2.0}, "max_tokens must be an int >= 1, got 2.0 (float)"),
        ({"temperature": -0.1}, "temperature must be >= 0 (0 means greedy), got -0.1"),
        ({"temperature": math.nan}, "temperature must be a finite number >= 0, got nan"),
        ({"temperature": math.inf}, "temperature must be a finite number >= 0, got inf"),
        ({"temperature": "1"}, "temperature must be a number >= 0, got '1' (str)"),
        ({"top_k": -1}, "top_k must be >= 0 (0 disables it), got -1"),
        ({"top_k": 1.5}, "top_k must be an int >= 0, got 1.5 (float)"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": math.nan}, "top_p must be a finite number in (0, 1], got nan"),
        ({"min_p": -0.01}, "min_p must be in [0, 1], got -0.01"),
        ({"min_p": 1.01}, "min_p must be in [0, 1], got 1.01"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0 (1 disables it), got 0.0"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
        ({"frequency_penalty": -2.01}, "frequency_penalty must be in [-2, 2], got -2.01"),
        ({"seed": -1}, f"seed must be in [0, {MAX_SEED}] or None, got -1"),
        ({"seed": 2**63}, f"seed must be in [0, {MAX_SEED}] or None, got {2**63}"),
        ({"seed": "7"}, "seed must be an int in"),
        ({"stop": [""]}, "stop must contain only non-empty strings, got ''"),
        ({"stop": ["a", 3]}, "stop must contain only non-empty strings, got 3"),
        ({"stop": 3}, "stop must be a string or a list of strings, got int"),
        ({"stop_token_ids": [1, -2]}, "stop_token_ids must be a list of ints >= 0 (each), got -2"),
        ({"stop_token_ids": [True]}, "stop_token_ids must be an int >= 0, got True (bool)"),
        ({"stop_token_ids": "12"}, "stop_token_ids must be a list of ints >= 0, got str"),
        ({"logprobs": 21}, "logprobs must be in [0, 20] or None, got 21"),
        ({"logprobs": -1}, "logprobs must be in [0, 20] or None, got -1"),
        ({"logprobs": False}, "logprobs must be an int in [0, 20], got False (bool)"),
        ({"ignore_eos": 1}, "ignore_eos must be a bool, got 1 (int)"),
        ({"skip_special_tokens": None}, "skip_special_tokens must be a bool, got None"),
    ],
)
def test_invalid_values_name_field_and_range(kwargs, message):
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(**kwargs)
    assert message in str(excinfo.value)


def test_boundaries_accepted():
    p = SamplingParams(
        max_tokens=1,
        temperature=0,
        top_k=1,
        top_p=1,
        min_p=1,
        repetition_penalty=0.01,
        presence_penalty=-2,
        frequency_penalty=2,
        seed=MAX_SEED,
        logprobs=20,
    )
    assert isinstance(p.temperature, float) and p.temperature == 0.0
    assert isinstance(p.top_p, float) and isinstance(p.presence_penalty, float)
    SamplingParams(seed=0, logprobs=0, top_p=1e-9, min_p=0)


def test_normalizes_stop_and_stop_token_ids():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)


def test_numpy_integers_become_ints():
    np = pytest.importorskip("numpy")
    p = SamplingParams(max_tokens=np.int64(5), seed=np.int32(3), temperature=np.float32(0.5))
    assert type(p.max_tokens) is int and type(p.seed) is int and type(p.temperature) is float


@pytest.mark.parametrize(
    "kwargs, greedy",
    [({"temperature": 0}, True), ({"top_k": 1}, True), ({"temperature": 0.01}, False), ({}, False)],
)
def test_is_greedy(kwargs, greedy):
    assert SamplingParams(**kwargs).is_greedy is greedy


def test_has_penalties():
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(presence_penalty=0.1).has_penalties
    assert SamplingParams(frequency_penalty=-0.1).has_penalties
