"""What one engine step costs, learned from the steps it ran. Pure Python (no torch).

A step's duration is modelled as ``base_step_s`` plus, when it carries prompt tokens,
``prompt_step_s + num_prompt_tokens * prompt_token_s``:

- ``base_step_s``: a step that carries only decodes (weights read once, one token per
  sequence), an exponentially weighted average of such steps;
- ``prompt_step_s``: what any step that carries prompt tokens pays on top, whatever their
  number. On a CPU running 4-bit weights it is large: a batch of more than a few rows runs the
  dense copy of the weights, several times the bytes of the 4-bit ones;
- ``prompt_token_s``: the extra time each prompt token adds.

The last two are a least-squares line through the recent prompt-carrying steps (what each took
beyond the base, against its prompt tokens), weighted towards the newest, so they follow the
machine's current speed (another process on the same cores, a changed batch size). Without
the intercept, a run of small chunks charges the fixed part to each token and prices a whole
prompt several times too high.

Workers publish :meth:`StepCosts.report` in their heartbeat; the router's cost model
(services/router/policy.py) predicts time to first token and the decode step a prompt chunk
would make from it, and the decode worker sizes its prompt chunks against its step target
with :meth:`StepCosts.prompt_budget`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_ALPHA = 0.2  # weight of the newest step: about the last ten steps dominate
_FIT_KEEP = 0.9  # what a prompt step's fit keeps of the older steps at each new one
# A step always lets this many prompt tokens through, however tight its target: prompts progress.
MIN_PROMPT_CHUNK_TOKENS = 32
_MIN_PROMPT_TOKENS = 16  # shorter prompt work is too noisy to separate from the base
# Prompt sizes must spread this much (relative standard deviation) to fit an intercept.
_MIN_RELATIVE_SPREAD = 0.1


@dataclass
class _RecentLine:
    """Least squares ``y = intercept + slope * x`` over samples weighted by recency."""

    weight: float = 0.0
    sum_x: float = 0.0
    sum_y: float = 0.0
    sum_xx: float = 0.0
    sum_xy: float = 0.0

    def add(self, x: float, y: float) -> None:
        k = _FIT_KEEP
        self.weight = k * self.weight + 1
        self.sum_x = k * self.sum_x + x
        self.sum_y = k * self.sum_y + y
        self.sum_xx = k * self.sum_xx + x * x
        self.sum_xy = k * self.sum_xy + x * y

    def solve(self, intercept: float) -> tuple[float, float]:
        """(intercept, slope), both >= 0. Too little spread in x to separate them: the given
        intercept is kept and the slope fitted through the mean."""
        mean_x, mean_y = self.sum_x / self.weight, self.sum_y / self.weight
        variance = self.sum_xx / self.weight - mean_x * mean_x
        if variance > (_MIN_RELATIVE_SPREAD * mean_x) ** 2:
            slope = (self.sum_xy / self.weight - mean_x * mean_y) / variance
            fitted = mean_y - slope * mean_x
            if slope > 0 and fitted >= 0:
                return fitted, slope
            if slope > 0:  # a negative intercept: the line through the origin
                return 0.0, self.sum_xy / self.sum_xx
        intercept = min(intercept, mean_y)
        return intercept, (mean_y - intercept) / mean_x if mean_x else 0.0


@dataclass
class StepCosts:
    base_step_s: float = 0.0  # 0 until a decode-only step was seen
    prompt_step_s: float = 0.0  # 0 until prompt steps of different sizes were seen
    prompt_token_s: float = 0.0  # 0 until a step with enough prompt tokens was seen
    _prompt_line: _RecentLine = field(default_factory=_RecentLine, repr=False)

    def record(self, num_prompt_tokens: int, num_decode_tokens: int, elapsed_s: float) -> None:
        """One finished step: how many prompt and decode tokens it computed, and how long."""
        if elapsed_s <= 0 or num_prompt_tokens + num_decode_tokens == 0:
            return
        if num_prompt_tokens == 0:
            self.base_step_s = _ewma(self.base_step_s, elapsed_s)
            return
        if num_prompt_tokens < _MIN_PROMPT_TOKENS:
            return
        base = self.base_step_s if num_decode_tokens else 0.0
        self._prompt_line.add(num_prompt_tokens, max(elapsed_s - base, 0.0))
        self.prompt_step_s, self.prompt_token_s = self._prompt_line.solve(self.prompt_step_s)

    @property
    def prompt_tokens_per_s(self) -> float:
        """Prompt throughput while prefilling (0 while unknown)."""
        return 1.0 / self.prompt_token_s if self.prompt_token_s > 0 else 0.0

    def prompt_budget(
        self,
        target_step_s: float,
        floor_tokens: int,
        cap_tokens: int,
        pending_prompt_tokens: int = 0,
        drain_s: float | None = None,
    ) -> int:
        """Prompt tokens a step may carry next to running decodes: what keeps the step within
        ``target_step_s``, or more when that is too slow to compute the ``pending_prompt_tokens``
        within ``drain_s`` (a time to first token that misses its SLO is no better than a slow
        stream); never below ``floor_tokens`` nor above ``cap_tokens``. The cap while either
        cost is still unknown.

        Draining W tokens in chunks of P takes (W / P) steps of (base + fixed + P * c)
        seconds, so W * (base + fixed) / P + W * c <= drain_s needs
        P >= W * (base + fixed) / (drain_s - W * c)."""
        if self.prompt_token_s <= 0 or self.base_step_s <= 0:
            return cap_tokens
        per_step_s = self.base_step_s + self.prompt_step_s
        fits = math.floor((target_step_s - per_step_s) / self.prompt_token_s)
        needed = 0
        if drain_s is not None and pending_prompt_tokens > 0:
            spare_s = drain_s - pending_prompt_tokens * self.prompt_token_s
            needed = (
                cap_tokens
                if spare_s <= 0
                else math.ceil(pending_prompt_tokens * per_step_s / spare_s - 1e-9)
            )
        return max(floor_tokens, min(cap_tokens, max(fits, needed)))

    def step_budget(
        self,
        target_step_s: float | None,
        drain_s: float | None,
        cap_tokens: int,
        pending_prompt_tokens: int,
    ) -> int | None:
        """An engine's prompt budget for its next step (None: it has no step target), as the
        engine and the simulator both compute it."""
        if target_step_s is None:
            return None
        floor = min(MIN_PROMPT_CHUNK_TOKENS, cap_tokens)
        return self.prompt_budget(target_step_s, floor, cap_tokens, pending_prompt_tokens, drain_s)

    def state(self) -> tuple[float, ...]:
        """Everything it has learned, as numbers (``from_state`` restores it exactly): a
        worker's step log carries it, so a simulation starts from what the worker knew."""
        line = self._prompt_line
        return (self.base_step_s, self.prompt_step_s, self.prompt_token_s, line.weight,
                line.sum_x, line.sum_y, line.sum_xx, line.sum_xy)  # fmt: skip

    @classmethod
    def from_state(cls, state: tuple[float, ...]) -> StepCosts:
        return cls(*state[:3], _RecentLine(*state[3:]))

    def report(self) -> dict[str, float]:
        """The figures a worker publishes with its load (seconds; tokens per second)."""
        return {
            "step_s": round(self.base_step_s, 6),
            "prompt_step_s": round(self.prompt_step_s, 6),
            "prompt_tokens_per_s": round(self.prompt_tokens_per_s, 1),
        }


def _ewma(current: float, sample: float) -> float:
    return sample if current <= 0 else current + _ALPHA * (sample - current)
