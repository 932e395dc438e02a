"""Turn one step's logits into one token per request.

Pipeline per row, in this order:
    penalties (repetition, presence, frequency) -> temperature -> top-k -> top-p -> min-p
    -> sample (greedy rows: argmax of the penalized logits, nothing after penalties applies).

Invariants:
- Filters are thresholds on the logit value, so ties at a boundary are all kept: top-k keeps
  every token whose logit >= the k-th largest; top-p keeps every token whose probability >=
  that of the last token of the smallest prefix (sorted by probability) with mass >= top_p;
  min-p keeps tokens with p >= min_p * p_max. A sampled token is always inside all three sets.
- Sampling is the exponential race argmax(p / E), E ~ Exp(1) i.i.d. over the vocabulary,
  which draws exactly from p.
- A seeded row's noise comes from a generator re-seeded with f(seed, len(output_token_ids))
  at every step, so its tokens depend only on (seed, prompt, outputs so far): not on batch
  composition, nor on which process sampled the earlier tokens (prefill vs decode node),
  nor on preemption and recompute. No generator state ever needs to travel.
- Logprobs are log_softmax of the raw logits (before penalties, temperature and filters),
  as vLLM returns by default; see docs/sampling.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingRow:
    """One request's view for this step."""

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
    """Seed for the noise of output position `step` of a request seeded with `seed`.

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
        token_ids = self._choose(apply_penalties(logits, rows), rows)  # [B]
        return _with_logprobs(logits, rows, token_ids)

    def _choose(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int]:
        # logits: [B, V], penalized
        token_ids = logits.argmax(dim=-1)  # [B]; right for greedy rows, overwritten for others
        random_idx = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if random_idx:
            sub_rows = [rows[i] for i in random_idx]
            x = apply_filters(logits[random_idx], [r.params for r in sub_rows])
            probs = torch.softmax(x, dim=-1)  # [R, V]
            noise = self._exponential_noise(sub_rows, probs.shape[1], probs.device)
            token_ids[random_idx] = probs.div_(noise).argmax(dim=-1)
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

    def _exponential_noise(
        self, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device
    ) -> torch.Tensor:
        """[R, V] Exp(1) noise, clamped away from 0 so that p / E is never 0 / 0."""
        noise = torch.empty(len(rows), vocab_size, device=device)
        shared = [i for i, r in enumerate(rows) if r.params.seed is None and r.generator is None]
        if shared:  # one draw for all of them
            gen = self._own_generator(noise.device)
            noise[shared] = torch.empty(len(shared), vocab_size, device=device).exponential_(
                generator=gen
            )
        for i, row in enumerate(rows):
            if row.params.seed is None and row.generator is None:
                continue
            gen = row.generator if row.generator is not None else torch.Generator(device)
            if row.params.seed is not None:
                gen.manual_seed(step_seed(row.params.seed, len(row.output_token_ids)))
            draw = torch.empty(vocab_size, device=gen.device).exponential_(generator=gen)
            noise[i] = draw.to(device)
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _token_tensor(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(row index, token id) pairs of a ragged batch, as two flat int64 tensors."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    row_idx = torch.repeat_interleave(torch.arange(len(rows)), lengths).to(device)
    tokens = [torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in rows]
    return row_idx, torch.cat(tokens).to(device) if tokens else torch.empty(0, dtype=torch.long)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Penalized copy of logits [B, V] (the input itself when no row has penalties).

    repetition (HF/vLLM, over prompt + output tokens): positive logits are divided by the
    penalty, negative ones multiplied. presence/frequency (OpenAI, output tokens only):
    logit -= presence * [count > 0] + frequency * count.
    """
    idx = [i for i, r in enumerate(rows) if r.params.has_penalties]
    if not idx:
        return logits
    sub = [rows[i] for i in idx]
    x = logits[idx]  # [P, V], a copy
    device = x.device

    counts = torch.zeros_like(x)  # [P, V] occurrences in the output
    row_idx, tok = _token_tensor([r.output_token_ids for r in sub], device)
    counts.index_put_((row_idx, tok), torch.ones_like(tok, dtype=x.dtype), accumulate=True)

    rep = torch.tensor([r.params.repetition_penalty for r in sub], device=device)[:, None]
    if bool((rep != 1.0).any()):
        seen = counts > 0  # [P, V] in prompt or output
        row_idx, tok = _token_tensor([r.prompt_token_ids for r in sub], device)
        seen[row_idx, tok] = True
        penalized = torch.where(x > 0, x / rep, x * rep)
        x = torch.where(seen, penalized, x)

    presence = torch.tensor([r.params.presence_penalty for r in sub], device=device)[:, None]
    frequency = torch.tensor([r.params.frequency_penalty for r in sub], device=device)[:, None]
    x -= frequency * counts + presence * (counts > 0).to(x.dtype)
    out = logits.clone()
    out[idx] = x
    return out


def apply_filters(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on logits [R, V]; filtered-out tokens get -inf.

    Returns a new tensor. Every row keeps at least its argmax token.
    """
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
    # Subtracting the max first keeps tiny temperatures from overflowing to +inf.
    x = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # [R, V], max is 0
    threshold = _top_k_top_p_threshold(x, params)  # [R, 1]
    min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
    # p >= min_p * p_max  <=>  x >= log(min_p) + x_max, and x_max == 0 here; log(0) = -inf.
    threshold = torch.maximum(threshold, torch.log(min_p))
    return x.masked_fill_(x < threshold, float("-inf"))


def _top_k_top_p_threshold(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Per-row logit threshold [R, 1] implementing top-k then top-p (-inf where disabled)."""
    rows, vocab_size = x.shape
    disabled = torch.full((rows, 1), float("-inf"), device=x.device)
    k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    use_top_k = min(k) < vocab_size
    use_top_p = any(p.top_p < 1.0 for p in params)
    if not (use_top_k or use_top_p):
        return disabled
    k_index = torch.tensor(k, device=x.device)[:, None] - 1  # [R, 1]
    if not use_top_p:  # top-k alone: a partial top-k instead of a full sort
        max_k = max(n for n in k if n < vocab_size)
        values = torch.topk(x, max_k, dim=-1).values  # [R, max_k], descending
        kth = values.gather(1, k_index.clamp(max=max_k - 1))
        return torch.where(k_index < vocab_size - 1, kth, disabled)

    ordered = torch.sort(x, dim=-1, descending=True).values  # [R, V]
    kth = ordered.gather(1, k_index)  # [R, 1]; the minimum when top-k is off
    ordered.masked_fill_(ordered < kth, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1).sub_(probs)  # [R, V], non-decreasing
    top_p = torch.tensor([p.top_p for p in params], device=x.device)[:, None]
    num_kept = (mass_before < top_p).sum(dim=-1, keepdim=True)  # >= 1 since top_p > 0
    top_p_threshold = ordered.gather(1, num_kept - 1)
    # top_p == 1 must keep the whole top-k set even when float cumsum reaches 1 early.
    return torch.where(top_p < 1.0, torch.maximum(kth, top_p_threshold), kth)


def _with_logprobs(
    logits: torch.Tensor, rows: Sequence[SamplingRow], token_ids: list[int]
) -> list[SampledToken]:
    result = [SampledToken(t, None, None) for t in token_ids]
    idx = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not idx:
        return result
    logprobs = torch.log_softmax(logits[idx].float(), dim=-1)  # [L, V], raw distribution
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
