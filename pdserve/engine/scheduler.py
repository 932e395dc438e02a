"""Continuous-batching scheduler. Pure Python: plain data in, a plan out.

Each step spends a token budget: running sequences first (a decode costs one token, an
unfinished chunked prefill the rest of its prompt up to the budget), then waiting sequences in
arrival order (their prompt minus the cached prefix, chunked to what is left of the budget).
When the pool runs out, the most recently admitted running sequence is preempted: its blocks are
released and it is recomputed later (its cached full blocks usually survive in the prefix cache).

A step may also get a prompt budget: at most that many prompt tokens (new prompts, unfinished
chunked prefills, recomputation) ride along with the running decodes, so that a long prompt
arriving at a busy worker stretches its decodes' step only as far as the caller allows.
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
        seq = self.seq  # (``seq.num_tokens`` inlined: asked of every chunk of every step)
        return self.start + self.num_tokens == len(seq.prompt_token_ids) + len(seq.output_token_ids)

    @property
    def is_decode(self) -> bool:
        """One new token of a sequence whose prompt is computed."""
        return self.num_tokens == 1 and self.start >= len(self.seq.prompt_token_ids)


@dataclass
class SchedulerPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens computed for prompts (or recomputation), not single decode tokens."""
        return sum(c.num_tokens for c in self.chunks if not c.is_decode)

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

    @property
    def num_pending_prompt_tokens(self) -> int:
        """Prompt (or recomputation) tokens still to compute, waiting or mid-prefill; a
        waiting prompt's cached prefix is not known before admission and counts in full."""
        pending = 0
        for seq in self.running:  # (``_is_decoding`` inlined: this runs at every step)
            num_prompt, computed = len(seq.prompt_token_ids), seq.num_computed_tokens
            left = num_prompt + len(seq.output_token_ids) - computed
            if computed < num_prompt or left != 1:
                pending += left
        for seq in self.waiting:
            pending += len(seq.prompt_token_ids) + len(seq.output_token_ids)
            pending -= seq.num_computed_tokens
        return pending

    def schedule(self, prompt_budget: int | None = None) -> SchedulerPlan:
        """The next step's chunks. ``prompt_budget``: the most prompt tokens it may carry
        while decodes run (None: only the token budget limits them)."""
        plan = SchedulerPlan()
        decoding = any(_is_decoding(s) for s in self.running)
        prompts = _PromptBudget(prompt_budget if decoding else None)
        budget = self._schedule_running(plan, self.max_num_batched_tokens, prompts)
        if not plan.preempted:
            self._schedule_waiting(plan, budget, prompts)
        return plan

    def _schedule_running(self, plan: SchedulerPlan, budget: int, prompts: _PromptBudget) -> int:
        index, bm, bs, running = 0, self.block_manager, self.block_manager.block_size, self.running
        chunks = plan.chunks
        while index < len(running) and budget > 0:
            seq = running[index]
            # (``_num_left`` and ``_is_decoding`` inlined: this loop visits every running
            # sequence at every step)
            num_prompt, computed = len(seq.prompt_token_ids), seq.num_computed_tokens
            left = num_prompt + len(seq.output_token_ids) - computed
            num_new = min(_num_left(seq) if seq.replay_output else left, budget)
            if computed < num_prompt or left != 1:
                num_new = prompts.take(num_new)
                if num_new == 0:
                    index += 1
                    continue
                prompts.spend(num_new)
            # Most steps fit in the blocks a sequence holds: nothing to check or allocate then.
            grows = -(-(computed + num_new) // bs) > len(seq.block_table)
            while grows and not bm.can_grow(seq, num_new):
                victim = running[-1]
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is seq:
                    break
            else:
                if grows:
                    bm.grow(seq, num_new)
                chunks.append(ScheduledChunk(seq, computed, num_new))
                budget -= num_new
                index += 1
                continue
            break
        return budget

    def _schedule_waiting(self, plan: SchedulerPlan, budget: int, prompts: _PromptBudget) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            allowed = prompts.take(budget)
            if allowed == 0 or not self.block_manager.admit(seq, allowed):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_new = min(_num_left(seq), allowed)
            prompts.spend(num_new)
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
        bm, finished = self.block_manager, SequenceStatus.FINISHED
        bs = bm.block_size
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.status is finished:
                continue
            computed = seq.num_computed_tokens = seq.num_computed_tokens + chunk.num_tokens
            if computed // bs > len(seq.block_keys):  # a block filled
                bm.commit_full_blocks(seq)
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


def _num_left(seq: Sequence) -> int:
    """Tokens the next chunk may compute. A replayed output (``seq.replay_output``) goes one
    token a step, the way it was first computed: the prompt chunk stops at the prompt's end."""
    left = seq.num_tokens - seq.num_computed_tokens
    if not seq.replay_output:
        return left
    if seq.num_computed_tokens < seq.num_prompt_tokens:
        return min(left, seq.num_prompt_tokens - seq.num_computed_tokens)
    return min(left, 1)


def _is_decoding(seq: Sequence) -> bool:
    """Its next step computes one new token of its output (not prompt or recomputed work)."""
    num_prompt, computed = len(seq.prompt_token_ids), seq.num_computed_tokens
    return computed >= num_prompt and num_prompt + len(seq.output_token_ids) - computed == 1


class _PromptBudget:
    """What is left of one step's prompt budget (None: unlimited). The scheduler applies one
    only while some running sequence decodes: prompts alone have no stream to protect."""

    def __init__(self, limit: int | None) -> None:
        self.left = limit

    def take(self, wanted: int) -> int:
        """How many of ``wanted`` prompt tokens fit; the caller spends what it schedules."""
        return wanted if self.left is None else min(wanted, self.left)

    def spend(self, num_tokens: int) -> None:
        if self.left is not None:
            self.left = max(0, self.left - num_tokens)
