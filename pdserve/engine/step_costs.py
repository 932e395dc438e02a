"""What one engine step costs, learned from the steps it ran. Pure Python (no torch).

A step's duration is modelled as ``base_step_s + num_prompt_tokens * prompt_token_s``:
``base_step_s`` is a step that carries only decodes (weights read once, one token per
sequence), ``prompt_token_s`` the extra time each prompt token adds. Both are exponentially
weighted averages, so they follow the machine's current speed (another process on the same
cores, a changed batch size) within a few steps:

- a step without prompt tokens updates ``base_step_s``;
- a step with prompt tokens updates ``prompt_token_s`` with what it took beyond the base.

Workers publish :meth:`StepCosts.report` in their heartbeat; the router's cost model
(services/router/policy.py) predicts time to first token and the decode step a prompt chunk
would make from it, and the decode worker sizes its prompt chunks against its step target
with :meth:`StepCosts.prompt_budget`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_ALPHA = 0.2  # weight of the newest step: about the last ten steps dominate
# A step always lets this many prompt tokens through, however tight its target: prompts progress.
MIN_PROMPT_CHUNK_TOKENS = 32
_MIN_PROMPT_TOKENS = 16  # shorter prompt work is too noisy to separate from the base


@dataclass
class StepCosts:
    base_step_s: float = 0.0  # 0 until a decode-only step was seen
    prompt_token_s: float = 0.0  # 0 until a step with enough prompt tokens was seen

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
        per_token = max(elapsed_s - base, 0.0) / num_prompt_tokens
        if per_token > 0:
            self.prompt_token_s = _ewma(self.prompt_token_s, per_token)

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

        Draining W tokens in chunks of P takes (W / P) steps of (base + P * c) seconds, so
        W * base / P + W * c <= drain_s needs P >= W * base / (drain_s - W * c)."""
        if self.prompt_token_s <= 0 or self.base_step_s <= 0:
            return cap_tokens
        fits = math.floor((target_step_s - self.base_step_s) / self.prompt_token_s)
        needed = 0
        if drain_s is not None and pending_prompt_tokens > 0:
            spare_s = drain_s - pending_prompt_tokens * self.prompt_token_s
            needed = (
                cap_tokens
                if spare_s <= 0
                else math.ceil(pending_prompt_tokens * self.base_step_s / spare_s - 1e-9)
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

    def report(self) -> dict[str, float]:
        """The figures a worker publishes with its load (seconds; tokens per second)."""
        return {
            "step_s": round(self.base_step_s, 6),
            "prompt_tokens_per_s": round(self.prompt_tokens_per_s, 1),
        }


def _ewma(current: float, sample: float) -> float:
    return sample if current <= 0 else current + _ALPHA * (sample - current)
