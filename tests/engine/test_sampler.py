import contextlib
import math
from unittest import mock

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pdserve.engine import sampler as sampler_module
from pdserve.engine.sampler import (
    SampledToken,
    Sampler,
    SamplingRow,
    apply_penalties,
    make_generator,
    step_seed,
)
from pdserve.engine.sampling_params import SamplingParams


def row(prompt=(), output=(), generator=None, **kwargs) -> SamplingRow:
    return SamplingRow(SamplingParams(**kwargs), generator, list(prompt), list(output))


def sampled_set(logits_row, n, sampler=None, **kwargs) -> set[int]:
    """Distinct tokens over n unseeded draws of the same distribution (one batched call)."""
    logits = torch.tensor(logits_row, dtype=torch.float32).repeat(n, 1)
    out = (sampler or Sampler(seed=0)).sample(logits, [row(**kwargs) for _ in range(n)])
    return {t.token_id for t in out}


PROBS = [0.5, 0.3, 0.15, 0.05]
LOG_PROBS = [math.log(p) for p in PROBS]


def test_greedy_fast_path_is_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, -1.0, 4.9]])
    out = Sampler().sample(logits, [row(temperature=0), row(temperature=0)])
    assert out == [SampledToken(1, None, None), SampledToken(0, None, None)]


def test_top_k_one_is_greedy():
    logits = torch.tensor([[0.0, 3.0, 2.9]])
    assert Sampler().sample(logits, [row(top_k=1, seed=1)])[0].token_id == 1


def test_penalties_exact_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    original = logits.clone()
    rows = [
        row(
            prompt=[0],
            output=[1, 1, 2],
            repetition_penalty=2.0,
            frequency_penalty=0.5,
            presence_penalty=0.25,
        ),
        row(prompt=[0], output=[1, 1, 2]),
    ]
    out = apply_penalties(logits, rows)
    # token 0: prompt only -> repetition only (2 / 2); token 1: negative, x2 then 2 * 0.5 + 0.25;
    # token 2: 0.5 / 2 - 0.5 - 0.25; token 3: never seen.
    assert out[0].tolist() == [1.0, -3.25, -0.5, 3.0]
    assert out[1].tolist() == original[1].tolist()
    assert torch.equal(logits, original)


def test_presence_penalty_negative_encourages_repeats():
    logits = torch.tensor([[1.0, 0.5]])
    rows = [row(output=[1], presence_penalty=-1.0, temperature=0)]
    assert apply_penalties(logits, rows)[0].tolist() == [1.0, 1.5]
    assert Sampler().sample(logits, rows)[0].token_id == 1


def test_greedy_uses_penalized_logits():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    rows = [row(prompt=[0], temperature=0, repetition_penalty=2.0)]
    assert Sampler().sample(logits, rows)[0].token_id == 1


@pytest.mark.parametrize("cap", [0, 2])
def test_top_p_exact_set(cap):
    with candidates(cap):
        assert sampled_set(LOG_PROBS, 3000, top_p=0.45) == {0}
        assert sampled_set(LOG_PROBS, 3000, top_p=0.55) == {0, 1}
        assert sampled_set(LOG_PROBS, 3000, top_p=0.9) == {0, 1, 2}
        assert sampled_set(LOG_PROBS, 3000, top_p=1.0) == {0, 1, 2, 3}


@pytest.mark.parametrize("cap", [0, 2])
def test_top_k_exact_set_and_ties_kept(cap):
    with candidates(cap):
        assert sampled_set(LOG_PROBS, 3000, top_k=2) == {0, 1}
        # Every token tied with the k-th largest logit is kept.
        assert sampled_set([3.0, 2.0, 2.0, 0.0], 3000, top_k=2) == {0, 1, 2}
        assert sampled_set([3.0, 2.0, 2.0, 0.0], 3000, top_k=10) == {0, 1, 2, 3}
        assert sampled_set([3.0, 2.0, 2.0, 2.0, 0.0], 3000, top_k=3, top_p=0.99) == {0, 1, 2, 3}


def test_min_p_exact_set():
    # p >= 0.5 * p_max = 0.25 keeps tokens 0 and 1.
    assert sampled_set(LOG_PROBS, 3000, min_p=0.5) == {0, 1}
    assert sampled_set(LOG_PROBS, 3000, min_p=1.0) == {0}


@pytest.mark.parametrize("cap", [0, 2])
def test_top_p_applies_after_top_k(cap):
    with candidates(cap):
        # Within top-2 the renormalized probabilities are 0.625 / 0.375.
        assert sampled_set(LOG_PROBS, 3000, top_k=2, top_p=0.6) == {0}
        assert sampled_set(LOG_PROBS, 3000, top_k=2, top_p=0.7) == {0, 1}
        # Within top-3: 0.526 / 0.316 / 0.158, running mass 0.526 / 0.842 / 1.
        assert sampled_set(LOG_PROBS, 3000, top_k=3, top_p=0.83) == {0, 1}
        assert sampled_set(LOG_PROBS, 3000, top_k=3, top_p=0.85) == {0, 1, 2}


def test_samples_follow_the_tempered_distribution():
    logits = [1.0, 0.0, -0.5, 2.0]
    temperature, n = 0.7, 40_000
    batch = torch.tensor(logits).repeat(n, 1)
    out = Sampler(seed=1).sample(batch, [row(temperature=temperature) for _ in range(n)])
    counts = torch.bincount(torch.tensor([t.token_id for t in out]), minlength=4).double()
    expected = torch.softmax(torch.tensor(logits, dtype=torch.float64) / temperature, dim=0)
    assert torch.allclose(counts / n, expected, atol=0.01)


def test_tiny_temperature_and_masked_logits():
    logits = torch.tensor([[-math.inf, 10.0, 9.0, -math.inf]]).repeat(200, 1)
    out = Sampler(seed=0).sample(logits, [row(temperature=1e-6) for _ in range(200)])
    assert {t.token_id for t in out} == {1}
    out = Sampler(seed=0).sample(logits, [row(temperature=5.0) for _ in range(200)])
    assert {t.token_id for t in out} == {1, 2}


def test_rows_must_match_logits():
    with pytest.raises(ValueError, match="logits must be"):
        Sampler().sample(torch.zeros(2, 5), [row()])


def generate(sampler, seeded: SamplingRow, neighbours: int, steps: int, vocab: int = 257):
    """Run `steps` decode steps of `seeded` beside `neighbours` other rows; its tokens."""
    torch.manual_seed(neighbours)
    for _ in range(steps):
        others = [
            row(
                output=[1] * i,
                temperature=0.5 + i % 3,
                top_k=[0, 3, 40, 1][i % 4],
                top_p=[1.0, 0.8][i % 2],
                seed=(i if i % 2 else None),
                repetition_penalty=1.0 + i % 2,
            )
            for i in range(neighbours)
        ]
        logits_gen = torch.Generator().manual_seed(len(seeded.output_token_ids))
        mine = torch.randn(1, vocab, generator=logits_gen)
        batch = torch.cat([torch.randn(neighbours, vocab), mine])
        token = sampler.sample(batch, [*others, seeded])[-1].token_id
        seeded.output_token_ids.append(token)
    return list(seeded.output_token_ids)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_p": 0.9},
        {"top_k": 20, "top_p": 0.9, "min_p": 0.01},  # the top-k candidate path
        {"temperature": 0.7, "presence_penalty": 0.5},
    ],
)
def test_same_seed_same_tokens_regardless_of_batch(kwargs):
    alone = generate(Sampler(seed=1), row(seed=1234, **kwargs), neighbours=0, steps=12)
    in_batch = generate(Sampler(seed=2), row(seed=1234, **kwargs), neighbours=7, steps=12)
    with_gen = generate(
        Sampler(), row(seed=1234, generator=make_generator(1234), **kwargs), neighbours=3, steps=12
    )
    assert alone == in_batch == with_gen
    other_seed = generate(Sampler(seed=1), row(seed=1235, **kwargs), neighbours=0, steps=12)
    assert other_seed != alone


def test_seeded_row_can_resume_elsewhere():
    """A decode node continuing a request reproduces what one process would have sampled."""
    full = generate(Sampler(), row(seed=7), neighbours=2, steps=6)
    resumed = generate(Sampler(), row(seed=7, output=full[:3]), neighbours=5, steps=3)
    assert resumed == full


def test_unseeded_rows_reproducible_from_sampler_seed():
    logits = torch.randn(8, 100)
    rows = [row(top_p=0.9) for _ in range(8)]
    first = Sampler(seed=5).sample(logits, rows)
    assert Sampler(seed=5).sample(logits, rows) == first
    assert Sampler(seed=6).sample(logits, rows) != first


def test_step_seed_is_a_valid_torch_seed():
    seeds = {step_seed(s, k) for s in (0, 1, 2**63 - 1) for k in range(100)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)


def test_logprobs_are_raw_log_softmax():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [1.0, 2.0, 0.5, -1.0], [0.0, 1.0, 2.0, 3.0]])
    rows = [
        row(output=[1], logprobs=2, temperature=0.3, repetition_penalty=1.5, seed=3),
        row(logprobs=0, temperature=0),
        row(temperature=0),
    ]
    out = Sampler().sample(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert out[0].logprob == pytest.approx(raw[0, out[0].token_id].item())
    assert [t for t, _ in out[0].top_logprobs] == [1, 0]
    assert [lp for _, lp in out[0].top_logprobs] == pytest.approx(raw[0, [1, 0]].tolist())
    assert out[1].token_id == 1 and out[1].top_logprobs == []
    assert out[1].logprob == pytest.approx(raw[1, 1].item())
    assert out[2] == SampledToken(3, None, None)


# Ties are common in these logits on purpose: a quarter-step grid.
logit_lists = st.integers(2, 40).flatmap(
    lambda v: st.lists(
        st.one_of(st.integers(-40, 40).map(lambda i: i / 4), st.floats(-20, 20, width=32)),
        min_size=v,
        max_size=v,
    )
)


def allowed_tokens(logits: list[float], p: SamplingParams) -> set[int]:
    """The set top-k, top-p and min-p allow, in float64 with a float32-sized tolerance."""
    z = torch.tensor(logits, dtype=torch.float64)
    z = (z - z.max()) / p.temperature
    tol = 1e-5 * (1.0 + z.abs().max().item())
    keep = torch.ones_like(z, dtype=torch.bool)
    if 0 < p.top_k < len(logits):
        kth = torch.sort(z, descending=True).values[p.top_k - 1]
        keep &= z >= kth - tol
    if p.top_p < 1.0:
        masked = z.masked_fill(~keep, -math.inf)
        probs = torch.softmax(masked, dim=0)
        order = torch.argsort(masked, descending=True)
        mass_before, boundary = 0.0, None
        for token in order.tolist():
            if mass_before >= p.top_p + 1e-5:
                break
            boundary = masked[token].item()
            mass_before += probs[token].item()
        keep &= z >= boundary - tol
    if p.min_p > 0.0:
        keep &= z >= math.log(p.min_p) - tol
    return set(torch.nonzero(keep).flatten().tolist())


@contextlib.contextmanager
def candidates(width: int):
    """width 0: every top-k and top-p goes through a full sort; else top-p first tries the
    `width` largest values (torch.topk), then falls back to the sort for wider nuclei."""
    if width:
        with mock.patch.object(sampler_module, "TOP_P_CANDIDATES", width):
            yield
        return
    with (
        mock.patch.object(sampler_module, "TOP_P_CANDIDATES", 1),
        mock.patch.object(sampler_module, "MAX_PARTIAL_WIDTH", 1),
    ):
        yield


def assert_only_allowed_tokens(logits: list[float], candidate_width: int = 3, **kwargs) -> None:
    # Two seeded rows (one generator each) and many unseeded ones: many draws per example,
    # so a filter that leaks even a low-probability token gets caught.
    seed = kwargs.pop("seed")
    seeds = [seed, (seed + 1) % 2**63] + [None] * 126
    params = [SamplingParams(seed=s, **kwargs) for s in seeds]
    allowed = allowed_tokens(logits, params[0])
    batch = torch.tensor(logits, dtype=torch.float32).repeat(len(params), 1)
    with candidates(candidate_width):
        out = Sampler(seed=seed).sample(batch, [SamplingRow(p, None, [], []) for p in params])
    assert {t.token_id for t in out} <= allowed


seeds = st.integers(0, 2**63 - 1)


@settings(max_examples=300, deadline=None)
@given(
    logits=logit_lists,
    temperature=st.floats(0.05, 3.0),
    top_k=st.one_of(st.just(0), st.integers(1, 45)),
    top_p=st.one_of(st.just(1.0), st.floats(1e-3, 1.0)),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    seed=seeds,
    cap=st.sampled_from([0, 3]),
)
def test_sampled_token_always_allowed(logits, temperature, top_k, top_p, min_p, seed, cap):
    assert_only_allowed_tokens(
        logits, cap, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed
    )


@settings(max_examples=150, deadline=None)
@given(
    logits=logit_lists,
    temperature=st.floats(0.5, 3.0),
    data=st.data(),
    seed=seeds,
    cap=st.sampled_from([0, 3]),
)
def test_top_k_alone_never_leaks(logits, temperature, data, seed, cap):
    top_k = data.draw(st.integers(1, len(logits) - 1))
    assert_only_allowed_tokens(logits, cap, temperature=temperature, top_k=top_k, seed=seed)


@settings(max_examples=150, deadline=None)
@given(logits=logit_lists, temperature=st.floats(0.5, 3.0), top_p=st.floats(0.01, 0.99), seed=seeds)
def test_top_p_alone_never_leaks(logits, temperature, top_p, seed):
    assert_only_allowed_tokens(logits, temperature=temperature, top_p=top_p, seed=seed)


@settings(max_examples=150, deadline=None)
@given(logits=logit_lists, temperature=st.floats(0.5, 3.0), min_p=st.floats(0.01, 0.99), seed=seeds)
def test_min_p_alone_never_leaks(logits, temperature, min_p, seed):
    assert_only_allowed_tokens(logits, temperature=temperature, min_p=min_p, seed=seed)


@pytest.mark.parametrize("block", [1, 2, 256])
def test_inverse_cdf_never_picks_zero_weight(block):
    weights = torch.tensor([[0.0, 0.0, 1.0, 0.0, 2.0]] * 4)
    uniform = torch.tensor([0.0, 1.0 / 3.0, 0.5, 1.0 - 2**-53], dtype=torch.float64)
    # cumsum [0, 0, 1, 1, 3]: u * 3 = 0 -> 2; exactly 1 -> 4 (first sum > 1); 1.5 -> 4; ~3 -> 4.
    assert sampler_module._inverse_cdf(weights, uniform, block).tolist() == [2, 4, 4, 4]


@pytest.mark.parametrize("block", [3, 256])
def test_inverse_cdf_matches_the_distribution(block):
    weights = torch.tensor([[0.5, 0.0, 2.0, 1.0, 0.0, 0.5, 0.0]])
    uniform = torch.linspace(0, 1, 4001, dtype=torch.float64)[:-1]
    chosen = sampler_module._inverse_cdf(weights.repeat(4000, 1), uniform, block)
    counts = torch.bincount(chosen, minlength=7).tolist()
    assert counts == [500, 0, 2000, 1000, 0, 500, 0]


@pytest.mark.parametrize(
    "kwargs", [{"top_p": 0.9}, {"top_k": 40, "top_p": 0.8}, {"top_k": 7, "min_p": 0.1}]
)
def test_threshold_does_not_depend_on_the_search_path(kwargs):
    """topk-then-fallback and full sort select the same values, so the same tokens."""
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 2
    rows = [row(seed=i, **kwargs) for i in range(64)]
    results = []
    for width in (0, 2, 16, 256):
        with candidates(width):
            results.append([t.token_id for t in Sampler().sample(logits, rows)])
    assert results[0] == results[1] == results[2] == results[3]


def expected_distribution(logits: list[float], p: SamplingParams) -> list[float] | None:
    """Exact sampling distribution in float64 (None when a boundary is too close to call).

    Logits on a quarter grid and power-of-two temperatures keep float32 arithmetic exact,
    so ties are ties in both.
    """
    z = torch.tensor(logits, dtype=torch.float64)
    z = (z - z.max()) / p.temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if 0 < p.top_k < len(logits):
        keep &= z >= torch.sort(z, descending=True).values[p.top_k - 1]
    if p.top_p < 1.0:
        probs = torch.softmax(z.masked_fill(~keep, -math.inf), dim=0)
        ordered = torch.sort(probs[keep], descending=True).values
        mass = torch.cumsum(ordered, dim=0)
        if bool(((mass - p.top_p).abs() < 1e-4).any()):
            return None
        boundary = ordered[int((mass < p.top_p).sum())]
        keep &= probs >= boundary
    if p.min_p > 0.0:
        ratio = torch.exp(z)
        if bool(((ratio - p.min_p).abs() < 1e-4).any()):
            return None
        keep &= ratio >= p.min_p
    probs = torch.softmax(z.masked_fill(~keep, -math.inf), dim=0)
    return probs.tolist()


@settings(max_examples=200, deadline=None)
@given(
    logits=st.integers(2, 12).flatmap(
        lambda v: st.lists(st.integers(-16, 8).map(lambda i: i / 4), min_size=v, max_size=v)
    ),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    top_k=st.one_of(st.just(0), st.integers(1, 12)),
    top_p=st.one_of(st.just(1.0), st.floats(0.05, 0.99)),
    min_p=st.one_of(st.just(0.0), st.floats(0.01, 0.9)),
    width=st.sampled_from([0, 1, 2, 256]),
)
def test_draw_follows_the_filtered_distribution_exactly(
    logits, temperature, top_k, top_p, min_p, width
):
    """Uniforms on a regular grid: each token gets its probability's share of the grid."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    expected = expected_distribution(logits, params)
    assume(expected is not None)
    n = 4096
    uniform = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    batch = torch.tensor(logits).repeat(n, 1)
    with candidates(width):
        chosen = sampler_module.sample_rows(batch, [params] * n, uniform)
    counts = torch.bincount(chosen, minlength=len(logits)).tolist()
    for count, p in zip(counts, expected, strict=True):
        assert abs(count - n * p) <= 2, (counts, [round(n * q, 1) for q in expected])


def test_ties_past_the_window_all_kept():
    # top_k=2 keeps the four tokens tied at 2.0, more than the window of 2 plus one column.
    assert sampled_set([3.0, 2.0, 2.0, 2.0, 2.0, 0.0], 3000, top_k=2) == {0, 1, 2, 3, 4}
    assert sampled_set([3.0, 2.0, 2.0, 2.0, 2.0, 0.0], 3000, top_k=2, top_p=0.99) == {0, 1, 2, 3, 4}
