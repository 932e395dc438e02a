"""What the simulator charges instead of running: a step's duration and the KV handoff.

A step is described by :class:`StepShape` (its fields may be numpy arrays, so a stretch of
decode steps is costed in one call). Two cost models implement :class:`CostModel`:

- :class:`CalibratedCost`, from a ``pdserve profile`` file: a least-squares fit of this
  machine's measured step times (see :mod:`pdserve.sim.profile`), and the measured handoff.
- :class:`pdserve.sim.roofline.RooflineCost`, for a GPU and a model shape.

The handoff is pipelined as the real one is: the decode worker pulls each layer as the
prefill worker seals it, so the KV is at the decode worker at
``max(prefill_end + latency + bytes / layers / bandwidth, prefill_start + latency + bytes / bandwidth)``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pdserve.workload.format import WorkloadError

# The step-time regressors, in the order of a profile's ``coefficients``.
FEATURES = ("const", "num_tokens", "num_seqs", "attended_pairs", "context_tokens")


@dataclass(frozen=True)
class StepShape:
    num_tokens: np.ndarray | float  # tokens computed this step (all chunks)
    num_seqs: np.ndarray | float  # chunks (sequences) in the batch
    attended_pairs: np.ndarray | float  # query-key pairs: sum of n * (start + (n + 1) / 2)
    context_tokens: np.ndarray | float  # KV read: sum of (start + n)


@dataclass(frozen=True)
class EngineLimits:
    """The per-replica engine settings the simulator builds each Scheduler with."""

    num_kv_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512


class CostModel(Protocol):
    name: str
    limits: EngineLimits
    gpus_per_replica: int  # what a replica costs (tensor parallelism); 1 on a CPU
    dispatch_s: float  # router + RPC time before a request reaches its worker
    prefill_tokens_per_s: float  # the router's prior for admission (one replica's prefill)
    # Part of step_s a worker's loop adds around each engine step: not in the step time the
    # engine itself measures (its StepCosts) and reports.
    worker_overhead_s: float
    # A step's time is multiplied by this while another replica computes (replicas that share
    # one machine's cores and memory; 1.0: independent replicas, as GPUs are).
    contention_factor: float
    prefill_factor: float  # a prefill replica's step time over a decode replica's, same shape

    def step_s(self, shape: StepShape) -> np.ndarray | float: ...

    def handoff_ready_s(
        self, prefill_start_s: float, prefill_end_s: float, num_tokens: int
    ) -> float: ...


@dataclass(frozen=True)
class Link:
    latency_s: float
    bytes_per_s: float
    kv_bytes_per_token: float
    num_layers: int

    def ready_s(self, start_s: float, end_s: float, num_tokens: int) -> float:
        nbytes = num_tokens * self.kv_bytes_per_token
        last_layer = end_s + self.latency_s + nbytes / self.num_layers / self.bytes_per_s
        return max(last_layer, start_s + self.latency_s + nbytes / self.bytes_per_s)


@dataclass(frozen=True)
class CalibratedCost:
    """Step time = coefficients · (1, tokens, seqs, attended pairs, context tokens), plus the
    measured residual of steps with the same number of batched tokens where the profile has
    enough of them (``token_residuals_s``: a batch's matrix products take their kernels' time
    for that row count, which is not linear in it on a CPU), plus the worker loop's overhead."""

    name: str
    coefficients: tuple[float, ...]
    limits: EngineLimits
    link: Link | None
    dispatch_s: float
    prefill_tokens_per_s: float
    gpus_per_replica: int = 1
    worker_overhead_s: float = 0.0
    token_residuals_s: tuple[tuple[int, float], ...] = ()  # (batched tokens, seconds)
    contention_factor: float = 1.0
    prompt_step_s: float = 0.0  # what a step carrying prompt tokens pays on top
    prefill_factor: float = 1.0

    def step_s(self, shape: StepShape):
        c = self.coefficients
        linear = (c[0] + self.worker_overhead_s + c[1] * shape.num_tokens + c[2] * shape.num_seqs
                  + c[3] * shape.attended_pairs + c[4] * shape.context_tokens)  # fmt: skip
        if self.prompt_step_s:  # (a step carries prompt tokens when it has more than one a seq)
            linear = linear + self.prompt_step_s * (np.asarray(shape.num_tokens)
                                                    > np.asarray(shape.num_seqs))  # fmt: skip
        if not self.token_residuals_s:
            return linear
        table = dict(self.token_residuals_s)
        if np.ndim(shape.num_tokens) == 0:
            return linear + table.get(int(shape.num_tokens), 0.0)
        return linear + np.array([table.get(int(n), 0.0) for n in shape.num_tokens])

    def handoff_ready_s(self, prefill_start_s: float, prefill_end_s: float, num_tokens: int):
        if self.link is None:
            raise ValueError(
                f"profile {self.name} has no handoff section: run `pdserve profile --url` "
                "against a disaggregated stack to simulate prefill workers"
            )
        return self.link.ready_s(prefill_start_s, prefill_end_s, num_tokens)


def load_profile(path: str | Path) -> CalibratedCost:
    """A ``pdserve profile`` file; a malformed one raises WorkloadError naming the field."""
    path = Path(path)
    try:
        text = path.read_text()
        data = json.loads(text)
    except OSError as exc:
        raise WorkloadError(path, None, None, f"cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise WorkloadError(path, exc.lineno, None, f"not JSON ({exc.msg})") from None
    try:
        return _parse_profile(path, data)
    except WorkloadError as exc:
        if exc.line is not None or exc.field is None:
            raise
        raise WorkloadError(path, _line_of(text, exc.field), exc.field, exc.problem) from None


def _line_of(text: str, dotted: str) -> int | None:
    """The line of the field's key in the file, or of its nearest enclosing key (a missing
    field); None when neither appears."""
    for key in reversed(dotted.split(".")):
        found = re.search(rf'"{re.escape(key)}"\s*:', text)
        if found:
            return text.count("\n", 0, found.start()) + 1
    return None


def _parse_profile(path: Path, data) -> CalibratedCost:
    fit = _field(path, data, "step_fit", dict)
    coefficients = _field(path, fit, "step_fit.coefficients", list)
    if len(coefficients) != len(FEATURES) or not all(_finite(c) for c in coefficients):
        raise WorkloadError(path, None, "step_fit.coefficients",
                            f"must be {len(FEATURES)} numbers ({', '.join(FEATURES)})")  # fmt: skip
    engine = _field(path, data, "engine", dict)
    limits = EngineLimits(**{k: _positive_int(path, engine, f"engine.{k}")
                             for k in ("num_kv_blocks", "block_size", "max_num_seqs",
                                       "max_num_batched_tokens")})  # fmt: skip
    link = None
    if "handoff" in data:
        h = _field(path, data, "handoff", dict)
        link = Link(_positive(path, h, "handoff.latency_s", zero_ok=True),
                    _positive(path, h, "handoff.bytes_per_s"),
                    _positive(path, engine, "engine.kv_bytes_per_token"),
                    _positive_int(path, engine, "engine.num_layers"))  # fmt: skip
    dispatch = _field(path, data, "dispatch", dict) if "dispatch" in data else {}
    return CalibratedCost(
        name=str(path),
        coefficients=tuple(float(c) for c in coefficients),
        limits=limits,
        link=link,
        dispatch_s=_positive(path, dispatch, "dispatch.latency_s", zero_ok=True)
        if dispatch else 0.0,
        prefill_tokens_per_s=_positive(path, fit, "step_fit.prefill_tokens_per_s"),
        # A worker's loop adds this to each of its engine steps (the stack's calibration).
        worker_overhead_s=_positive(path, dispatch, "dispatch.step_overhead_s", zero_ok=True)
        if "step_overhead_s" in dispatch else 0.0,
        token_residuals_s=_residuals(path, fit),
        contention_factor=_positive(path, fit, "step_fit.contention_factor")
        if "contention_factor" in fit else 1.0,
        prompt_step_s=_positive(path, fit, "step_fit.prompt_step_s", zero_ok=True)
        if "prompt_step_s" in fit else 0.0,
        prefill_factor=_positive(path, fit, "step_fit.prefill_worker_factor")
        if "prefill_worker_factor" in fit else 1.0,
    )  # fmt: skip


def _residuals(path: Path, fit: dict) -> tuple[tuple[int, float], ...]:
    """``step_fit.token_residuals_s``: {batched tokens: seconds} (optional)."""
    table = fit.get("token_residuals_s", {})
    if not isinstance(table, dict) or not all(k.isdigit() and _finite(v) for k, v in table.items()):
        raise WorkloadError(path, None, "step_fit.token_residuals_s",
                            "must map token counts to seconds")  # fmt: skip
    return tuple(sorted((int(k), float(v)) for k, v in table.items()))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _field(path: Path, obj: dict, dotted: str, kind: type):
    value = obj.get(dotted.rsplit(".", 1)[-1]) if isinstance(obj, dict) else None
    if not isinstance(value, kind):
        raise WorkloadError(path, None, dotted, f"missing or not a {kind.__name__}")
    return value


def _positive(path: Path, obj: dict, dotted: str, zero_ok: bool = False) -> float:
    value = obj.get(dotted.rsplit(".", 1)[-1]) if isinstance(obj, dict) else None
    if not _finite(value) or value < 0 or (value == 0 and not zero_ok):
        raise WorkloadError(path, None, dotted, f"must be a number > 0, got {value!r}")
    return float(value)


def _positive_int(path: Path, obj: dict, dotted: str) -> int:
    value = _positive(path, obj, dotted)
    if not value.is_integer():
        raise WorkloadError(path, None, dotted, f"must be a whole number, got {value!r}")
    return int(value)
