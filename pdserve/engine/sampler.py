"""Turn one step's logits into one token per request.

Pipeline per row, in this order:
    penalties (repetition, presence, frequency) -> temperature -> top-k -> top-p -> min-p
    -> sample (greedy rows: argmax of the penalized logits, nothing after penalties applies).

Invariants:
- Filters are thresholds on the logit value, so ties at a boundary are all kept: top-k keeps
  every token whose logit >= the k-th largest; top-p keeps every token whose probability >=
  that of the last token of the smallest prefix (sorted by probability) with mass >= top_p;
  min-p keeps tokens with p >= min_p * p_max. A sampled token is always inside all three sets.
- Sampling is inverse-CDF with ONE float64 uniform per row per step: the first token whose
  running (float64) sum of weights exceeds u * total, in vocabulary order. A zero-weight
  (filtered) token can never be chosen: the running sum does not grow across it.
- A seeded row's uniform comes from a generator re-seeded with f(seed, len(output_token_ids))
  at every step, and every per-row computation is independent of the other rows, so its
  tokens depend only on (seed, logits, params): not on batch composition, nor on which
  process sampled the earlier tokens (prefill vs decode node), nor on preemption. No
  generator state ever needs to travel.
- Logprobs are log_softmax of the raw logits (before penalties, temperature and filters), as
  vLLM returns by default; see the README's "Sampling parameters" section.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pdserve.engine.sampling_params import SamplingParams

# Rows with top-p or min-p (and no top-k) look at this many largest values first (one
# torch.topk); those whose kept set is wider fall back to a sort / a full-vocabulary draw.
TOP_P_CANDIDATES = 256
# Where those do not reach top_p: the top-p boundary is then looked for among this many
# largest values (a partial sort), then among all of them.
TOP_P_FALLBACK_WIDTH = 4096
# Above this many values numpy's partition + sort beats torch.topk on CPU.
MAX_PARTIAL_WIDTH = 1024
_MASK64 = (1 << 64) - 1
_NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """One request's view for this step.

    Token lists may be Python sequences or 1-D integer tensors (cheaper for long prompts
    when repetition_penalty is on: they are turned into tensors at every step).
    """

    params: SamplingParams
    # Seeded rows (params.seed set): a reusable generator, re-seeded every step (None: the
    # sampler makes one). Unseeded rows: a stateful generator to draw from as-is, or None
    # for the sampler's own.
    generator: torch.Generator | None
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]


@dataclass
class SampledToken:
    token_id: int
    # log_softmax of the raw logits at token_id; None unless params.logprobs is set.
    logprob: float | None
    # params.logprobs best (token_id, raw logprob) pairs, best first; None unless requested.
    top_logprobs: list[tuple[int, float]] | None


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator for one request, or None when the request is unseeded."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def step_seed(seed: int, step: int) -> int:
    """Seed for the draw at output position `step` of a request seeded with `seed`.

    splitmix64 of (seed, step): neighbouring seeds and steps give unrelated streams.
    """
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1  # torch seeds are < 2**63 on every backend


def _needs_work(params: SamplingParams) -> bool:
    return not params.is_greedy or params.has_penalties or params.logprobs is not None


class Sampler:
    """Stateless apart from the generators that serve unseeded rows."""

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
        """logits: [B, V] float32, row b belongs to rows[b]. Does not modify `logits`."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, V], got {list(logits.shape)}")
        if not any(_needs_work(r.params) for r in rows):
            return [SampledToken(t, None, None) for t in logits.argmax(dim=-1).tolist()]
        token_ids = self._choose(apply_penalties(logits, rows), rows)
        return _with_logprobs(logits, rows, token_ids)

    def _choose(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int]:
        # logits: [B, V], penalized
        random_idx = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if not random_idx:
            return logits.argmax(dim=-1).tolist()
        greedy_idx = [i for i, r in enumerate(rows) if r.params.is_greedy]
        token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        if greedy_idx:
            token_ids[greedy_idx] = logits[greedy_idx].argmax(dim=-1)
        random_rows = [rows[i] for i in random_idx]
        uniform = self._uniforms(random_rows, logits.device)  # [R] float64
        sub = logits if len(random_idx) == len(rows) else logits[random_idx]
        token_ids[random_idx] = sample_rows(sub, [r.params for r in random_rows], uniform)
        return token_ids.tolist()

    def _own_generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed)
            self._generators[device] = gen
        return gen

    def _uniforms(self, rows: Sequence[SamplingRow], device: torch.device) -> torch.Tensor:
        """[R] float64 in [0, 1): exactly one draw per row, from that row's generator if any.

        Seeded rows without a generator draw on the CPU, so their uniforms (hence their
        tokens, up to float rounding in the filters) are the same on every device.
        """
        uniform = torch.empty(len(rows), dtype=torch.float64, device=device)
        own = [
            i for i, r in enumerate(rows) if r.params.seed is not None or r.generator is not None
        ]
        shared = sorted(set(range(len(rows))) - set(own))
        if shared:
            gen = self._own_generator(uniform.device)
            uniform[shared] = torch.rand(
                len(shared), dtype=torch.float64, device=device, generator=gen
            )
        if own:
            draws = [_row_uniform(rows[i]) for i in own]
            uniform[own] = torch.tensor(draws, dtype=torch.float64, device=device)
        return uniform


def _row_uniform(row: SamplingRow) -> float:
    gen = row.generator if row.generator is not None else torch.Generator()
    if row.params.seed is not None:
        gen.manual_seed(step_seed(row.params.seed, len(row.output_token_ids)))
    return torch.rand(1, dtype=torch.float64, device=gen.device, generator=gen).item()


# -- penalties -----------------------------------------------------------------------------


def _flat_token_index(
    token_lists: Sequence[Sequence[int]], row_ids: Sequence[int], vocab_size: int
) -> torch.Tensor:
    """row * vocab_size + token for every token of a ragged batch: [N] int64 (CPU)."""
    tokens = [torch.as_tensor(t, dtype=torch.long).reshape(-1).cpu() for t in token_lists]
    lengths = torch.tensor([len(t) for t in tokens], dtype=torch.long)
    offsets = torch.repeat_interleave(torch.tensor(row_ids, dtype=torch.long) * vocab_size, lengths)
    return torch.cat(tokens) + offsets if tokens else offsets


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Penalized copy of logits [B, V] (the input itself when no row has penalties).

    repetition (HF/vLLM, over prompt + output tokens, each token once): positive logits are
    divided by the penalty, negative ones multiplied. presence/frequency (OpenAI, output
    tokens only): logit -= presence * [count > 0] + frequency * count. Only the logits of
    tokens that occurred are touched, so the cost is one copy plus O(tokens so far).
    """
    if not any(r.params.has_penalties for r in rows):
        return logits
    out = logits.clone(memory_format=torch.contiguous_format)
    flat_view, vocab_size = out.view(-1), out.shape[1]

    rep_rows = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep_rows:
        seen = torch.cat(
            [
                _flat_token_index(
                    [rows[i].prompt_token_ids for i in rep_rows], rep_rows, vocab_size
                ),
                _flat_token_index(
                    [rows[i].output_token_ids for i in rep_rows], rep_rows, vocab_size
                ),
            ]
        ).unique()
        penalty = torch.tensor([r.params.repetition_penalty for r in rows])[seen // vocab_size]
        seen, penalty = seen.to(out.device), penalty.to(out.device, out.dtype)
        values = flat_view[seen]
        penalized = torch.where(values > 0, values / penalty, values * penalty)
        # An extreme penalty (a float32 subnormal, 1e38) overflows to +-inf, and an inf logit
        # made the step's softmax NaN and failed every request in the batch: stay finite.
        finite = torch.finfo(out.dtype)
        flat_view[seen] = penalized.clamp_(finite.min, finite.max)

    pf_rows = [
        i
        for i, r in enumerate(rows)
        if r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0
    ]
    if pf_rows:
        flat = _flat_token_index([rows[i].output_token_ids for i in pf_rows], pf_rows, vocab_size)
        flat, counts = flat.unique(return_counts=True)
        row = flat // vocab_size
        presence = torch.tensor([r.params.presence_penalty for r in rows])[row]
        frequency = torch.tensor([r.params.frequency_penalty for r in rows])[row]
        delta = (frequency * counts + presence).to(out.device, out.dtype)
        flat = flat.to(out.device)
        flat_view[flat] = flat_view[flat] - delta
    return out


# -- filters and the draw ------------------------------------------------------------------


def sample_rows(
    logits: torch.Tensor, params: Sequence[SamplingParams], uniform: torch.Tensor
) -> torch.Tensor:
    """One token per row of logits [R, V] (non-greedy rows), given uniforms [R] -> [R] int64.

    temperature -> one threshold per row (top-k, then top-p, then min-p) -> one draw that
    walks the kept tokens in vocabulary order.
    """
    num_rows, vocab_size = logits.shape
    if vocab_size == 1:
        return torch.zeros(num_rows, dtype=torch.long, device=logits.device)
    temperature = torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
    # Subtracting the max first keeps tiny temperatures from overflowing to +inf.
    x = torch.sub(logits, logits.amax(dim=-1, keepdim=True)).div_(temperature)  # [R, V], max 0
    filtered = [i for i, p in enumerate(params) if _has_filter(p, vocab_size)]
    if not filtered:
        return _inverse_cdf(x.exp_(), uniform)
    token_ids = torch.empty(num_rows, dtype=torch.long, device=logits.device)
    plain = sorted(set(range(num_rows)) - set(filtered))
    if plain:
        token_ids[plain] = _inverse_cdf(x[plain].exp_(), uniform[plain])
    sub = x if not plain else x[filtered]
    token_ids[filtered] = _sample_filtered(sub, [params[i] for i in filtered], uniform[filtered])
    return token_ids


def _has_filter(p: SamplingParams, vocab_size: int) -> bool:
    return 0 < p.top_k < vocab_size or p.top_p < 1.0 or p.min_p > 0.0


def _sample_filtered(
    x: torch.Tensor, params: Sequence[SamplingParams], uniform: torch.Tensor
) -> torch.Tensor:
    """Rows with a filter; x [F, V] = log(p / p_max). -> [F] token ids.

    Each row has its own candidate window (its top-k, else the TOP_P_CANDIDATES largest
    values). When the first value past that window is filtered out, every kept token is
    inside it and the draw touches only the window; otherwise it runs over the vocabulary.
    """
    num_rows, vocab_size = x.shape
    window = [
        min(p.top_k if 0 < p.top_k < vocab_size else TOP_P_CANDIDATES, vocab_size - 1)
        for p in params
    ]
    values, indices = _top_with_indices(x, max(window) + 1)  # [F, W + 1], descending
    own = torch.tensor(window, device=x.device)[:, None]  # [F, 1]
    threshold = _thresholds(x, values, own, params)  # [F, 1]
    inside = (values.gather(1, own) < threshold)[:, 0]
    token_ids = torch.empty(num_rows, dtype=torch.long, device=x.device)
    rows_in = torch.nonzero(inside).flatten().tolist()
    rows_out = torch.nonzero(~inside).flatten().tolist()
    if rows_in:
        token_ids[rows_in] = _draw_among(
            values[rows_in], indices[rows_in], threshold[rows_in], uniform[rows_in]
        )
    if rows_out:
        x_out = x[rows_out]  # [O, V], a copy
        keep = x_out >= threshold[rows_out]
        token_ids[rows_out] = _inverse_cdf(x_out.exp_().mul_(keep), uniform[rows_out])
    return token_ids


def _top_with_indices(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `width` largest values of each row of x [R, V] and their token ids, descending."""
    if width <= MAX_PARTIAL_WIDTH or x.device.type != "cpu":
        values, indices = torch.topk(x, width, dim=-1)
        return values, indices
    # numpy's partition and sort are several times faster than torch's on CPU.
    negated = x.neg().numpy()
    top = np.argpartition(negated, width - 1, axis=-1)[:, :width]
    order = np.argsort(np.take_along_axis(negated, top, axis=-1), axis=-1)
    indices = torch.from_numpy(np.take_along_axis(top, order, axis=-1))
    return x.gather(1, indices), indices


def _top_values(x: torch.Tensor, width: int) -> torch.Tensor:
    """The `width` largest values of each row of x [R, V], descending: [R, width]."""
    if x.device.type != "cpu":
        if width < x.shape[1]:
            return torch.topk(x, width, dim=-1).values
        return torch.sort(x, dim=-1, descending=True).values
    # numpy's partition and sort are several times faster than torch's on CPU.
    negated = x.neg().numpy()
    if width < x.shape[1]:
        negated = np.partition(negated, width - 1, axis=-1)[:, :width]
    return torch.from_numpy(np.sort(negated, axis=-1)).neg_()


def _thresholds(
    x: torch.Tensor, values: torch.Tensor, own: torch.Tensor, params: Sequence[SamplingParams]
) -> torch.Tensor:
    """[F, 1]: the tokens kept by top-k, top-p and min-p are exactly those with x >= it.

    values [F, W + 1]: the largest values of x, descending; own [F, 1]: each row's window.
    """
    vocab_size = x.shape[1]
    k = torch.tensor([p.top_k if 0 < p.top_k < vocab_size else 0 for p in params], device=x.device)
    k = k[:, None]
    kth = torch.where(k > 0, values.gather(1, (k - 1).clamp(min=0)), _NEG_INF)  # ties stay
    threshold = torch.maximum(kth, _top_p_threshold(x, values, own, kth, params))
    min_p = torch.tensor([p.min_p for p in params], device=x.device)[:, None]
    # p >= min_p * p_max  <=>  x >= log(min_p); log(0) = -inf keeps everything.
    return torch.maximum(threshold, min_p.log_())


def _top_p_threshold(
    x: torch.Tensor,
    values: torch.Tensor,
    own: torch.Tensor,
    kth: torch.Tensor,
    params: Sequence[SamplingParams],
) -> torch.Tensor:
    """[F, 1] value of the last token of the shortest prefix (by value) with mass >= top_p.

    Mass is that of the distribution after top-k (tokens with x >= kth). The prefix is
    looked for in the row's own window, then (rows where the window does not reach top_p)
    among the TOP_P_FALLBACK_WIDTH largest values, then among all; each stage sees the same
    leading values in the same order, so it finds the same boundary. Sums run left to right
    over the row's own values and the total follows a rule fixed by the row alone, so the
    result never depends on the rest of the batch.
    """
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64, device=x.device)
    threshold = torch.full((x.shape[0], 1), _NEG_INF, device=x.device)
    rows = torch.nonzero(top_p < 1.0).flatten().tolist()
    if not rows:
        return threshold
    v, o, kth = values[rows], own[rows], kth[rows]  # [P, W + 1], [P, 1], [P, 1]
    positions = torch.arange(v.shape[1], device=x.device)[None, :]
    weights = v.exp().masked_fill_((v < kth) | (positions >= o), 0.0)
    cumulative = torch.cumsum(weights, dim=-1, dtype=torch.float64)
    window_mass = cumulative.gather(1, o - 1)
    # A top-k row whose kept set (ties included) ends inside its window: that is the total.
    closed = (kth > _NEG_INF) & (v.gather(1, o) < kth)
    total = window_mass.clone()
    open_rows = torch.nonzero(~closed[:, 0]).flatten().tolist()
    if open_rows:
        x_open = x if len(open_rows) == x.shape[0] else x[[rows[i] for i in open_rows]]
        kept = x_open.exp()  # [O, V]
        kth_open = kth[open_rows]
        if bool((kth_open > _NEG_INF).any()):  # top-k rows with ties past their window
            kept.masked_fill_(x_open < kth_open, 0.0)
        total[open_rows] = kept.sum(dim=-1, keepdim=True).double()
    target = top_p[rows, None] * total
    found, reached = _mass_boundary(v, weights, cumulative, target)
    missing = torch.nonzero(~reached).flatten().tolist()
    for width in (min(TOP_P_FALLBACK_WIDTH, x.shape[1]), x.shape[1]):
        if not missing:
            break
        x_missing = x[[rows[i] for i in missing]]
        x_missing.masked_fill_(x_missing < kth[missing], _NEG_INF)
        ordered = _top_values(x_missing, width)
        weights = ordered.exp()
        cumulative = torch.cumsum(weights, dim=-1, dtype=torch.float64)
        found[missing], reached = _mass_boundary(ordered, weights, cumulative, target[missing])
        missing = [missing[j] for j in torch.nonzero(~reached).flatten().tolist()]
    threshold[rows] = found
    return threshold


def _mass_boundary(
    ordered: torch.Tensor, weights: torch.Tensor, cumulative: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values sorted descending [P, N] with their weights and float64 running sums, and
    target masses [P, 1]: the value of the first token whose running mass reaches the
    target [P, 1], and whether that happens within these N values [P]."""
    num_kept = (cumulative - weights < target).sum(dim=-1, keepdim=True)  # >= 1: target > 0
    reached = (cumulative[:, -1:] >= target)[:, 0]
    return ordered.gather(1, num_kept.clamp(max=ordered.shape[1]) - 1), reached


def _draw_among(
    values: torch.Tensor, indices: torch.Tensor, threshold: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """Draw among candidates [I, W] (values, token ids) holding every kept token -> [I].

    Kept candidates are put in vocabulary order first, so the draw is the one
    `_inverse_cdf` makes over the whole vocabulary, whatever order topk left ties in.
    """
    keep = values >= threshold
    vocab_order = indices.masked_fill(~keep, torch.iinfo(indices.dtype).max).argsort(dim=-1)
    token_ids = indices.gather(1, vocab_order)
    weights = values.gather(1, vocab_order).exp().mul_(keep.gather(1, vocab_order))
    cumulative = torch.cumsum(weights, dim=-1, dtype=torch.float64)
    target = _below(uniform[:, None] * cumulative[:, -1:], cumulative[:, -1:])
    chosen = torch.searchsorted(cumulative, target, right=True).clamp_(max=values.shape[1] - 1)
    return token_ids.gather(1, chosen)[:, 0]


def _inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Index [R] drawn from unnormalized weights [R, N] >= 0 with uniforms [R] in [0, 1).

    Two levels, float64 sums: pick the block whose running sum first exceeds u * total,
    then the token inside it likewise. "First running sum > target" can never land on a
    zero weight (the running sum does not grow there), so filtered tokens are never chosen.
    Costs one pass over the weights plus O(N / block + block) per row.
    """
    rows, n = weights.shape
    if n % block:
        weights = torch.nn.functional.pad(weights, (0, block - n % block))  # zeros
    blocks = weights.view(rows, -1, block)  # [R, NB, block]
    # Block sums in float32 (exact enough over `block` values, and > 0 iff a weight is).
    block_cum = blocks.sum(dim=-1).double().cumsum_(dim=-1)  # [R, NB]
    target = _below(uniform[:, None] * block_cum[:, -1:], block_cum[:, -1:])
    b = torch.searchsorted(block_cum, target, right=True).clamp_(max=blocks.shape[1] - 1)
    before = torch.where(b > 0, block_cum.gather(1, (b - 1).clamp(min=0)), 0.0)
    inner = blocks.gather(1, b[:, :, None].expand(rows, 1, block))[:, 0]  # [R, block]
    inner_cum = inner.cumsum(dim=-1, dtype=torch.float64)
    inner_target = _below((target - before).clamp_(min=0.0), inner_cum[:, -1:])
    i = torch.searchsorted(inner_cum, inner_target, right=True).clamp_(max=block - 1)
    # Only a row with no finite logit at all (a model bug) could land past its end.
    return (b * block + i)[:, 0].clamp_(max=n - 1)


def _below(value: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """min(value, largest float64 below bound): keeps a target strictly under a total."""
    return torch.minimum(value, torch.nextafter(bound, torch.zeros_like(bound)))


# -- logprobs ------------------------------------------------------------------------------


def _with_logprobs(
    logits: torch.Tensor, rows: Sequence[SamplingRow], token_ids: list[int]
) -> list[SampledToken]:
    result = [SampledToken(t, None, None) for t in token_ids]
    idx = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not idx:
        return result
    raw = logits if len(idx) == len(rows) else logits[idx]  # [L, V]
    logprobs = torch.log_softmax(raw.float(), dim=-1)  # [L, V], the raw distribution
    chosen = torch.tensor([token_ids[i] for i in idx], device=logits.device)[:, None]
    chosen_lp = logprobs.gather(1, chosen)[:, 0].tolist()
    num_top = max(rows[i].params.logprobs for i in idx)
    top = torch.topk(logprobs, min(num_top, logprobs.shape[1]), dim=-1)
    top_ids, top_lps = top.indices.tolist(), top.values.tolist()
    for j, i in enumerate(idx):
        n = rows[i].params.logprobs
        result[i].logprob = chosen_lp[j]
        result[i].top_logprobs = list(zip(top_ids[j][:n], top_lps[j][:n], strict=True))
    return result
