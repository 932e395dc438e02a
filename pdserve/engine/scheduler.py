"""Continuous-batching scheduler. Pure Python: plain data in, a plan out.

Each step spends a token budget: running sequences first (a decode costs one token, an
unfinished chunked prefill the rest of its prompt up to the budget), then waiting sequences in
arrival order (their prompt minus the cached prefix, chunked to what is left of the budget).
When the pool runs out, the most recently admitted running sequence is preempted: its blocks are
released and it is recomputed later (its cached full blocks usually survive in the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # position of the first token computed in this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so its last logits are sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerPlan:
        plan = SchedulerPlan()
        budget = self._schedule_running(plan, self.max_num_batched_tokens)
        if not plan.preempted:
            self._schedule_waiting(plan, budget)
        return plan

    def _schedule_running(self, plan: SchedulerPlan, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.can_grow(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.grow(seq, num_new)
                plan.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_new))
                budget -= num_new
                index += 1
                continue
            break
        return budget

    def _schedule_waiting(self, plan: SchedulerPlan, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.admit(seq, budget):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            plan.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_new))
            budget -= num_new

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, plan: SchedulerPlan, sampled_token_ids: dict[str, int]) -> None:
        """Advance every scheduled sequence by its chunk and append its sampled token."""
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.is_finished:
                continue
            seq.num_computed_tokens += chunk.num_tokens
            self.block_manager.commit_full_blocks(seq)
            token_id = sampled_token_ids.get(seq.request_id)
            if token_id is not None:
                seq.output_token_ids.append(token_id)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Stop `seq` and release its blocks; safe to call in any state, and twice."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
