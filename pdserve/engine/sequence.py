"""A request as the scheduler sees it: plain data, no tensors.

Lifecycle: WAITING → RUNNING → FINISHED (stopped, length, aborted). A preempted sequence goes
back to WAITING with its blocks released and `num_computed_tokens` reset; its generated tokens
are kept and recomputed as part of its prompt (recompute preemption).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pdserve.engine.block_hash import BlockKey


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # the step computing it failed


# eq=False: a sequence is one request's mutable state, the same only as itself; the
# scheduler's list.remove and membership tests then compare identities, not every field.
@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    root_key: BlockKey
    arrival_index: int
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0
    # Prompt tokens served from the prefix cache at the (last) admission.
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Keys of the full blocks registered in the cache so far (prefix of block_table).
    block_keys: list[BlockKey] = field(default_factory=list)
    # Chained keys of the first full blocks of the tokens, each hashed once: tokens are only
    # appended, so a key never changes (it outlives a preemption, unlike block_keys).
    key_chain: list[BlockKey] = field(default_factory=list, repr=False)
    # The tokens of those blocks, as tuples, parallel to key_chain: built once per block, they
    # are what the prefix cache stores and compares on a hit.
    block_tokens: list[tuple[int, ...]] = field(default_factory=list, repr=False)
    num_preemptions: int = 0
    # A migrated request (output tokens produced by another engine): its output is recomputed
    # one token a step, through the decode path, so its KV is bit-for-bit what the first
    # engine computed and the next tokens are the ones it would have sampled.
    replay_output: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def tokens_in_range(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
