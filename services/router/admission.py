"""Backpressure: how long until a decode worker can hold one more request for its whole output.

Pure functions of plain data (no clock, no I/O), like policy.py, so tests and a simulator run
the same code. Inputs: what the worker reports in its heartbeat (batch slots, free and total
KV blocks, sequences running and waiting, its decode step time) and what this router has in
flight there (each request's remaining output and KV blocks).

A decode worker runs at most ``max_num_seqs`` sequences and holds each one's blocks until it
finishes. A new request starts when a slot and its blocks are free. The requests ahead of it
free theirs as they finish; their remaining outputs (max_tokens minus what was streamed) bound
when: all of them decode together, so the one with k tokens left is done after k steps::

    wait_s = step_s * remaining(the request ahead whose end frees enough slots and blocks)

It is an upper bound (a request may stop early at EOS), so admission errs towards refusing
with a Retry-After rather than accepting a request that would miss its deadline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Inflight:
    """One request this router has on the worker."""

    remaining_tokens: int
    num_blocks: int
    num_output_tokens: int = 0  # its whole output (max_tokens); 0: not known


@dataclass(frozen=True)
class DecodeCapacity:
    """A decode worker as admission sees it (reported values; 0 / None: not reported)."""

    max_num_seqs: int
    num_total_blocks: int
    num_free_blocks: int | None
    num_reported_seqs: int  # running + waiting, from its heartbeat (other routers' too)
    step_s: float
    inflight: Sequence[Inflight] = ()
    # Remaining output assumed for a sequence this router did not send (another replica's).
    unknown_remaining_tokens: int = 256


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)


def decode_wait_s(worker: DecodeCapacity, num_blocks: int) -> float | None:
    """Predicted wait before ``worker`` can start a request needing ``num_blocks`` blocks for
    its whole output; None when it never can (more blocks than the worker's pool)."""
    if worker.num_total_blocks and num_blocks > worker.num_total_blocks:
        return None
    num_unknown = max(0, worker.num_reported_seqs - len(worker.inflight))
    ahead = sorted(
        [*worker.inflight, *[Inflight(worker.unknown_remaining_tokens, 0)] * num_unknown],
        key=lambda r: r.remaining_tokens,
    )
    held = sum(r.num_blocks for r in worker.inflight)
    free_blocks = worker.num_total_blocks - held if worker.num_total_blocks else math.inf
    if worker.num_free_blocks is not None:
        free_blocks = min(free_blocks, worker.num_free_blocks)
    free_slots = worker.max_num_seqs - len(ahead)
    if free_slots > 0 and free_blocks >= num_blocks:
        return 0.0
    for request in ahead:
        free_slots += 1
        free_blocks += request.num_blocks
        if free_slots > 0 and free_blocks >= num_blocks:
            return request.remaining_tokens * worker.step_s
    return (ahead[-1].remaining_tokens if ahead else 0) * worker.step_s
