"""A worker's own record of its engine steps, one JSON line each (pure Python, no torch).

``pdserve profile`` calibrates the simulator's step costs from what the serving workers
measure while they serve, not from an engine run alone in a process of its own: a worker's
steps share its core with its gRPC threads, token streaming and span export, and its loop
adds work around each step. A worker with ``step_log_path`` set appends, after each step:

- ``t``: wall-clock time the step started (seconds since the epoch);
- the step's shape, the simulator's regressors (:class:`pdserve.sim.costs.StepShape`):
  ``num_tokens``, ``num_seqs``, ``attended_pairs``, ``context_tokens``, and its
  ``num_prompt_tokens`` and ``num_decodes`` (what ``StepCosts.record`` is given);
- ``engine_s``: how long ``LLMEngine.step`` took, as the worker times it;
- ``after_wait``: the loop slept between the previous step and this one (so the time between
  their starts is not the loop's time per step);
- ``costs``: the engine's ``StepCosts.state()`` after the step: what it has learned and
  reports in its heartbeat, so a simulation can start from exactly that state;
- ``role``: the worker's role.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from pdserve.engine.step_costs import StepCosts


@dataclass(frozen=True)
class StepRecord:
    t: float
    num_tokens: int
    num_seqs: int
    attended_pairs: float
    context_tokens: int
    num_prompt_tokens: int
    num_decodes: int
    engine_s: float
    after_wait: bool
    costs: tuple[float, ...]
    role: str = ""  # the worker's: "prefill" | "decode"


def plan_totals(plan) -> tuple[int, int, float, int, int, int]:
    """One pass over a ``SchedulerPlan``'s chunks (``start``, ``num_tokens``, ``is_decode``):
    tokens, sequences, attended (query, key) pairs, context tokens, prompt tokens and decodes:
    the step's shape as the step log records it and the simulator's cost models read it."""
    tokens = pairs = context = prompt = decodes = 0
    for c in plan.chunks:
        n, start = c.num_tokens, c.start
        tokens += n
        pairs += n * (start + (n + 1) / 2)
        context += start + n
        if c.is_decode:
            decodes += 1
        else:
            prompt += n
    return tokens, len(plan.chunks), pairs, context, prompt, decodes


def record_of(plan, started_wall_s: float, engine_s: float, after_wait: bool,
              costs: StepCosts, role: str) -> StepRecord:  # fmt: skip
    """The record of one step from its ``SchedulerPlan``."""
    return StepRecord(started_wall_s, *plan_totals(plan), engine_s, after_wait, costs.state(),
                      role)  # fmt: skip


class StepLogWriter:
    """Appends records to ``path`` (line-buffered: each line is whole once written)."""

    def __init__(self, path: str | Path) -> None:
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - held for the worker's life

    def write(self, record: StepRecord) -> None:
        line = record.__dict__ | {"costs": list(record.costs)}
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()


def read(path: str | Path, since_s: float = 0.0, until_s: float = float("inf")) -> list[StepRecord]:
    """The records of steps started in [since_s, until_s); a torn last line is skipped."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if since_s <= d["t"] < until_s:
                out.append(StepRecord(**(d | {"costs": tuple(d["costs"])})))
    return out


def loop_overheads_s(records: list[StepRecord]) -> list[float]:
    """What the worker's loop spent per step outside ``LLMEngine.step``: the time from one
    step's start to the next one's, less the first step, for consecutive steps (no sleep
    between them)."""
    return [b.t - a.t - a.engine_s for a, b in pairwise(records) if not b.after_wait]


def overlaps(records: list[StepRecord], others: list[StepRecord]) -> list[float]:
    """For each of ``records`` (one worker's, in order), the share of its engine time during
    which one of ``others`` (another worker's, in order) was computing."""
    out, first = [], 0
    for r in records:
        start, end = r.t, r.t + r.engine_s
        while first < len(others) and others[first].t + others[first].engine_s <= start:
            first += 1
        busy, i = 0.0, first
        while i < len(others) and others[i].t < end:
            o = others[i]
            busy += max(0.0, min(end, o.t + o.engine_s) - max(start, o.t))
            i += 1
        out.append(busy / r.engine_s if r.engine_s > 0 else 0.0)
    return out


def learned_costs(records: list[StepRecord], before_s: float) -> StepCosts | None:
    """The engine's StepCosts as they were at ``before_s`` (after its last step started
    before then); None if it had run no step."""
    last = None
    for r in records:
        if r.t >= before_s:
            break
        last = r
    return None if last is None else StepCosts.from_state(last.costs)
