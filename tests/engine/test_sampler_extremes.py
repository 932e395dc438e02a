"""Sampling parameters at the edges of their accepted ranges (float32 subnormals, 1e38) must
not fail a step: an inf logit made the softmax NaN and the draw index out of bounds, which
failed every request of the batch (found by the real-stack fuzz in tests/serving/
test_faults.py). Each row still gets a token in range, and an ordinary row beside it gets
exactly the token it gets alone."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.sampler import Sampler, SamplingRow, apply_penalties, make_generator
from pdserve.engine.sampling_params import SamplingParams

TINY = 1.401298464324817e-45  # the smallest float32 subnormal
HUGE = 3.4028234663852886e38  # float32's largest finite value
VOCAB = 257


def _row(seed: int, **params) -> SamplingRow:
    sampling = SamplingParams(seed=seed, **params)
    return SamplingRow(sampling, make_generator(seed), list(range(0, VOCAB, 3)), [1, 2])


@pytest.mark.parametrize(
    "params",
    [
        dict(repetition_penalty=TINY, top_p=0.5),
        dict(repetition_penalty=TINY),
        dict(repetition_penalty=HUGE, top_k=5),
        dict(repetition_penalty=TINY, temperature=TINY, min_p=0.5),
        dict(repetition_penalty=HUGE, temperature=HUGE, top_p=TINY),
    ],
)
def test_extreme_penalties_and_temperatures_sample_a_token_without_failing_the_batch(params):
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0)) * 10
    assert torch.isfinite(apply_penalties(logits, [_row(1, **params)] * 2)).all()
    ordinary = dict(temperature=0.8, top_p=0.9)
    both = Sampler().sample(logits, [_row(1, **params), _row(2, **ordinary)])
    alone = Sampler().sample(logits[1:], [_row(2, **ordinary)])
    assert 0 <= both[0].token_id < VOCAB
    assert both[1].token_id == alone[0].token_id
