"""Workload generators: Poisson and bursty arrivals, length distributions, shared system
prompts, and the packaged Azure conversation trace with time and length scaling. Seeded:
the same arguments give the same requests.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from pdserve.workload.format import Request, load

AZURE_CONV = "azure_conv_2023.csv"


def trace_path(name: str = AZURE_CONV) -> Path:
    """A trace shipped in the package (its README in the same folder holds the attribution)."""
    return Path(str(resources.files("pdserve.workload") / "traces" / name))


def azure_conv(
    time_scale: float = 1.0,
    length_scale: float = 1.0,
    max_requests: int | None = None,
    max_prompt_tokens: int | None = None,
) -> list[Request]:
    """The Azure LLM inference trace 2023, conversation (CC-BY 4.0), scaled: arrival times
    × ``time_scale`` (> 1 slows it down), token counts × ``length_scale``."""
    return scale(load(trace_path()), time_scale, length_scale, max_requests, max_prompt_tokens)


def scale(
    requests: list[Request],
    time_scale: float = 1.0,
    length_scale: float = 1.0,
    max_requests: int | None = None,
    max_prompt_tokens: int | None = None,
) -> list[Request]:
    if time_scale <= 0 or length_scale <= 0:
        raise ValueError("time_scale and length_scale must be > 0")
    out = []
    for r in requests[:max_requests]:
        prompt = max(1, round(r.num_prefill_tokens * length_scale))
        if max_prompt_tokens is not None:
            prompt = min(prompt, max_prompt_tokens)
        out.append(replace(
            r, arrived_at_s=r.arrived_at_s * time_scale, num_prefill_tokens=prompt,
            num_decode_tokens=max(1, round(r.num_decode_tokens * length_scale)),
            prefix_tokens=min(prompt, round(r.prefix_tokens * length_scale)),
        ))  # fmt: skip
    return out


def at_rate(requests: list[Request], rate_rps: float) -> list[Request]:
    """The same requests and order with arrival times stretched to a mean rate of ``rate_rps``."""
    span_s = requests[-1].arrived_at_s - requests[0].arrived_at_s
    if span_s <= 0 or len(requests) < 2:
        raise ValueError("a workload needs two distinct arrival times to be rescaled")
    k = (len(requests) - 1) / rate_rps / span_s
    t0 = requests[0].arrived_at_s
    return [replace(r, arrived_at_s=(r.arrived_at_s - t0) * k) for r in requests]


@dataclass(frozen=True)
class Lengths:
    """A token-length distribution, from a spec: ``fixed:N``, ``uniform:LO:HI``,
    ``lognormal:MEDIAN:SIGMA[:MAX]``, ``azure`` (resampled from the trace; prompts or outputs
    by ``column``), or a mixture ``0.7*uniform:32:128+0.3*uniform:384:768``."""

    spec: str

    def sampler(self, rng: random.Random, column: str):
        if "+" in self.spec or "*" in self.spec:
            return self._mixture(rng, column)
        kind, *args = self.spec.split(":")
        try:
            nums = [float(a) for a in args]
        except ValueError:
            raise ValueError(f"length spec {self.spec!r}: arguments must be numbers") from None
        if kind == "fixed" and len(nums) == 1:
            return lambda: int(nums[0])
        if kind == "uniform" and len(nums) == 2:
            return lambda: rng.randint(int(nums[0]), int(nums[1]))
        if kind == "lognormal" and len(nums) in (2, 3):
            top = int(nums[2]) if len(nums) == 3 else 1 << 30
            mu, sigma = math.log(nums[0]), nums[1]
            return lambda: max(1, min(top, round(rng.lognormvariate(mu, sigma))))
        if kind == "azure" and not nums:
            pool = [getattr(r, column) for r in load(trace_path())]
            return lambda: rng.choice(pool)
        raise ValueError(
            f"length spec {self.spec!r}: use fixed:N, uniform:LO:HI, lognormal:MEDIAN:SIGMA[:MAX], "
            "azure, or a mixture W*SPEC+W*SPEC"
        )

    def _mixture(self, rng: random.Random, column: str):
        weights, samplers = [], []
        for part in self.spec.split("+"):
            weight, star, spec = part.partition("*")
            try:
                weights.append(float(weight) if star else 1.0)
            except ValueError:
                raise ValueError(
                    f"length spec {self.spec!r}: weight {weight!r} is not a number"
                ) from None
            samplers.append(Lengths(spec if star else part).sampler(rng, column))
        return lambda: rng.choices(samplers, weights)[0]()


def synthetic(
    num_requests: int,
    rate_rps: float,
    prompt: Lengths = Lengths("lognormal:1020:0.9:4096"),
    output: Lengths = Lengths("lognormal:130:0.9:1024"),
    burstiness_cv: float = 1.0,
    shared_prefix_tokens: int = 0,
    shared_share: float = 0.0,
    num_prefix_groups: int = 1,
    seed: int = 0,
) -> list[Request]:
    """``num_requests`` arrivals at a mean ``rate_rps``: Poisson when ``burstiness_cv`` is 1,
    burstier above (gamma inter-arrival times with that coefficient of variation). A share
    ``shared_share`` of the requests starts with one of ``num_prefix_groups`` system prompts of
    ``shared_prefix_tokens`` tokens (added to their sampled prompt length)."""
    if num_requests < 1 or rate_rps <= 0 or burstiness_cv <= 0:
        raise ValueError("num_requests >= 1, rate_rps > 0 and burstiness_cv > 0 are required")
    rng = random.Random(seed)
    next_prompt = prompt.sampler(rng, "num_prefill_tokens")
    next_output = output.sampler(rng, "num_decode_tokens")
    shape = 1.0 / burstiness_cv**2
    t, out = 0.0, []
    for i in range(num_requests):
        if i:
            t += rng.gammavariate(shape, 1.0 / (rate_rps * shape))
        n_prompt, n_output = max(1, next_prompt()), max(1, next_output())
        if shared_prefix_tokens and rng.random() < shared_share:
            group = f"system-{rng.randrange(num_prefix_groups)}"
            out.append(Request(t, n_prompt + shared_prefix_tokens, n_output, group,
                               shared_prefix_tokens))  # fmt: skip
        else:
            out.append(Request(t, n_prompt, n_output))
    return out


def mean_rate_rps(requests: list[Request]) -> float:
    span_s = requests[-1].arrived_at_s - requests[0].arrived_at_s
    return (len(requests) - 1) / span_s if span_s > 0 else float("inf")
