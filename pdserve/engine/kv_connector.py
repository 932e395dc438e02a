"""The engine's KV-connector seam: the one way KV bytes leave or enter the paged pool.

Modelled on vLLM's KV-connector split, sized to this engine:

- **save side** (a prefill worker hands its KV on). The engine gives a :class:`KVSaver`,
  once per step and on the engine thread: ``begin_save`` with every full block the step
  completes (the saver picks which to save), ``save_layer`` with each layer's slice of the
  picked blocks as soon as that layer's KV is written (the layer pipeline), and ``end_save``
  when the step ends (``error`` set when it failed part-way: drop the unsealed blocks).
- **load side** (a decode worker receives KV). Scheduler side, on the engine thread:
  :meth:`LLMEngine.start_load` says how many prompt blocks can be loaded (the ones not in the
  engine's own prefix cache, as far as the pool has room) and reserves pool blocks for them.
  Worker side, on any thread: :meth:`LLMEngine.load_layer` / :meth:`LLMEngine.load_layers`
  (a group of layers, one copy) / :meth:`LLMEngine.load_blocks` write bytes into the reserved
  blocks, in any order, while the engine keeps stepping.
  Waiting for the layers is the caller's: once the blocks it wants are complete it calls
  ``LLMEngine.add_request(kv_load=..., num_loaded_blocks=n)`` (engine thread), which puts
  the first ``n`` blocks in the prefix cache and queues the request; the request's first
  prefill step then starts from them. :meth:`LLMEngine.release_load` gives the blocks back
  on every other path (cancel, deadline, failure).

Invariants: reserved blocks are referenced by the :class:`KVLoad` alone, so no step reads or
evicts them until they are committed; a load is committed or released exactly once, under its
lock, and a write after that raises ValueError instead of touching the pool.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.engine.block_hash import BlockKey


@dataclass(frozen=True)
class SaveBlock:
    """A full block some request's step completes: block ``index`` of its token sequence."""

    request_id: str
    index: int
    key: BlockKey


class KVSaver(abc.ABC):
    """Receives a step's completed blocks layer by layer (engine thread; must not block)."""

    @abc.abstractmethod
    def begin_save(self, blocks: Sequence[SaveBlock]) -> Sequence[SaveBlock]:
        """The step's completed blocks; returns the ones to save, in the order the layer
        payloads of :meth:`save_layer` will follow (each key at most once)."""

    @abc.abstractmethod
    def save_layer(self, layer: int, payloads: Sequence[bytes]) -> None:
        """Layer ``layer``'s slice of each block picked by :meth:`begin_save`:
        ``[2, block_size, kv_heads, head_dim]`` bytes, found at byte offset
        ``layer * layer_nbytes`` of the whole block."""

    @abc.abstractmethod
    def end_save(self, error: Exception | None) -> None:
        """The step ended (``error``: it failed after ``begin_save``; nothing more comes)."""


@dataclass(eq=False)
class KVLoad:
    """Pool blocks reserved for a request's prompt blocks ``keys[first:]``.

    ``keys`` are the chain keys of the prompt's full blocks offered by the sender;
    ``keys[:first]`` are already in this engine's prefix cache and are not loaded."""

    request_id: str
    token_ids: tuple[int, ...]  # the tokens the keys cover
    keys: tuple[BlockKey, ...]
    first: int
    block_ids: list[int] = field(default_factory=list)  # one per keys[first:], engine-private
    done: bool = False  # committed or released
    # Held while bytes are written and while the load is committed or released, so a writer
    # on another thread never writes into blocks that were already handed to someone else.
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def keys_to_load(self) -> tuple[BlockKey, ...]:
        return self.keys[self.first : self.first + len(self.block_ids)]

    @property
    def num_to_load(self) -> int:
        return len(self.block_ids)
