"""How ``pdserve up`` lays its engine workers out on the host's CPUs. Pure functions.

An engine worker runs its matrix products on an OpenMP pool; two pools on one core do not
share it, they take turns at every barrier, so a step can take several times its compute.
Hence each worker gets cores of its own and as many threads as cores:

- pool sizes (``--prefill``/``--decode`` left out): a single core runs one colocated decode
  worker; from ``MIN_CPUS_TO_DISAGGREGATE`` cores on, one prefill and one decode worker, each
  on its own cores. On the 2-core machine this project is measured on, that split met the
  goodput SLO where one colocated worker with both cores did not (benchmarks/goodput.py:
  prompt chunks stretch the colocated worker's decode steps, and its two-thread pool loses
  more to any other load on the host than two one-thread pools);
- every engine worker gets a contiguous, disjoint share of the cores, decode workers first
  served with the remainder (their steps bound every stream's inter-token latency);
- with more workers than cores nothing is pinned and each worker runs one thread.

A role pinned by ``--cpu-affinity`` keeps that set for each of its workers, with as many
threads as the set has cores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MIN_CPUS_TO_DISAGGREGATE = 2


@dataclass(frozen=True)
class Pools:
    num_prefill: int
    num_decode: int
    reason: str


@dataclass(frozen=True)
class WorkerCpus:
    cpus: frozenset[int]  # empty: not pinned
    num_threads: int


def choose_pools(num_cpus: int, num_prefill: int | None, num_decode: int | None) -> Pools:
    """Pool sizes: the caller's where given, else what this many cores can use."""
    if num_prefill is not None and num_decode is not None:
        return Pools(num_prefill, num_decode, "as requested")
    if num_cpus < MIN_CPUS_TO_DISAGGREGATE:
        auto = Pools(0, 1, f"{num_cpus} cores < {MIN_CPUS_TO_DISAGGREGATE}: colocated")
    else:
        auto = Pools(1, 1, f"{num_cpus} cores: one prefill and one decode worker")
    if num_prefill is None and num_decode is None:
        return auto
    given = "--prefill" if num_prefill is not None else "--decode"
    return Pools(
        auto.num_prefill if num_prefill is None else num_prefill,
        auto.num_decode if num_decode is None else num_decode,
        f"{given} as requested, the other pool sized to {num_cpus} cores",
    )


def lay_out(
    workers: Sequence[tuple[str, str]],
    available: Sequence[int],
    pinned_roles: Mapping[str, set[int]],
) -> dict[str, WorkerCpus]:
    """``workers``: (name, role) pairs; returns each worker's cores and threads."""
    out = {
        name: WorkerCpus(frozenset(pinned_roles[role]), len(pinned_roles[role]))
        for name, role in workers
        if role in pinned_roles
    }
    free = [(name, role) for name, role in workers if role not in pinned_roles]
    if not free:
        return out
    cpus = sorted(set(available) - set().union(*pinned_roles.values()))
    if len(cpus) < len(free):
        out.update({name: WorkerCpus(frozenset(), 1) for name, _ in free})
        return out
    share, extra = divmod(len(cpus), len(free))
    by_priority = sorted(free, key=lambda w: w[1] != "decode")  # decode first, stable
    sizes = {name: share + (i < extra) for i, (name, _) in enumerate(by_priority)}
    start = 0
    for name, _ in free:
        group = cpus[start : start + sizes[name]]
        out[name] = WorkerCpus(frozenset(group), len(group))
        start += sizes[name]
    return out


def describe(layout: Mapping[str, WorkerCpus]) -> str:
    """One line for the operator: which worker runs where."""
    parts = []
    for name, w in layout.items():
        where = f" on {_ranges(sorted(w.cpus))}" if w.cpus else ", unpinned"
        parts.append(f"{name}: {w.num_threads} thread{'s' if w.num_threads > 1 else ''}{where}")
    return "; ".join(parts)


def _ranges(cpus: Sequence[int]) -> str:
    if not cpus:
        return ""
    runs, first, last = [], cpus[0], cpus[0]
    for c in cpus[1:]:
        if c != last + 1:
            runs.append((first, last))
            first = c
        last = c
    runs.append((first, last))
    return "cpu " + ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
