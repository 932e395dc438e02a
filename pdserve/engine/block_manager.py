"""Paged KV block allocator with reference counts and a prefix cache. Pure Python.

Invariants:
- A block is *free* when its ref_count is 0. A free block either holds nothing reusable (it
  is in `_free_uncached`, handed out first) or holds a registered full block (it is
  *evictable*; evicted least-recently-used first).
- The LRU order is `_lru`, a deque of block ids, oldest on the left, where an evictable block's
  position is its last entry; `_lru_entries[b]` counts the entries of block b. Making a block
  evictable (or touching it) appends an entry; taking it out (a prefix hit) leaves its entry,
  which is skipped when it surfaces (the block is not evictable or has a later entry). A deque
  entry costs a third of an `OrderedDict` node on the hot paths (free, evict), and the deque
  is compacted when skipped entries outnumber the pool.
- `_cached` maps a block key to the one block holding it; that block's `token_ids` are the
  block's tokens, compared on every hit so a key hit can never serve foreign tokens.
- A sequence releases its blocks tail-first, so a prefix's head blocks outlive its tail
  under eviction.

Per-block state lives in three flat lists indexed by block id (`_ref_counts`, `_keys`,
`_token_ids`) rather than one object per block: the hot loops (allocate with eviction, commit,
free, a simulator's hundreds of block visits per request) index a list instead of loading an
object and its attribute, and a pool is three lists to build. `blocks` gives read-only views.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass

from pdserve.engine.block_hash import BlockKey, next_block_key
from pdserve.engine.sequence import Sequence

KeyFn = Callable[[BlockKey, SequenceABC[int]], BlockKey]


class OutOfBlocksError(RuntimeError):
    """Raised when a request can never fit the pool, whatever is freed."""


@dataclass(frozen=True, slots=True)
class Block:
    """A read-only view of one block's state (``BlockManager.blocks``)."""

    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None
    token_ids: tuple[int, ...] | None = None


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        key_fn: KeyFn = next_block_key,
    ):
        """``key_fn`` chains a block's key from its parent's and its tokens: BLAKE2b in the
        engine; a simulator, whose token ids are synthetic, may pass a cheaper chaining."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.key_fn = key_fn
        self._ref_counts = [0] * num_blocks
        self._keys: list[BlockKey | None] = [None] * num_blocks
        self._token_ids: list[tuple[int, ...] | None] = [None] * num_blocks
        self._free_uncached: deque[int] = deque(range(num_blocks))
        self._lru: deque[int] = deque()
        self._lru_entries = [0] * num_blocks
        self._num_evictable = 0
        self._cached: dict[BlockKey, int] = {}
        self.num_evictions = 0
        self.num_reserved_blocks = 0  # held by KV loads (`reserve`) until `release_reserved`

    # -- queries ---------------------------------------------------------------------------
    @property
    def blocks(self) -> list[Block]:
        """Every block's state, as read-only views (built on each call: not for hot paths)."""
        return [
            Block(i, ref_count, key, token_ids)
            for i, (ref_count, key, token_ids) in enumerate(
                zip(self._ref_counts, self._keys, self._token_ids, strict=True)
            )
        ]

    def cached_keys(self) -> list[BlockKey]:
        """The keys of the blocks holding a registered block, in block id order."""
        return [key for key in self._keys if key is not None]

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_uncached) + self._num_evictable

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup(self, key: BlockKey, token_ids: SequenceABC[int]) -> int | None:
        block_id = self._cached.get(key)
        if block_id is None:
            return None
        return block_id if self._token_ids[block_id] == tuple(token_ids) else None

    def block_key(self, seq: Sequence, index: int) -> BlockKey:
        """The chained key of full block ``index`` of ``seq``, hashed once per sequence
        (memoized in ``seq.key_chain``, its tokens in ``seq.block_tokens``; the caller
        guarantees the block is full)."""
        chain = seq.key_chain
        if index < len(chain):
            return chain[index]
        bs, key_fn, block_tokens = self.block_size, self.key_fn, seq.block_tokens
        parent = chain[-1] if chain else seq.root_key
        for start in range(len(chain) * bs, (index + 1) * bs, bs):
            tokens = tuple(seq.tokens_in_range(start, start + bs))
            parent = key_fn(parent, tokens)
            chain.append(parent)
            block_tokens.append(tokens)
        return parent

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The block ids of the longest cached prefix of `seq` (their keys are the first ones of
        ``seq.key_chain``), never covering its last token (at least one token must be computed
        to produce logits)."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        cached, token_ids = self._cached, self._token_ids
        chain, block_tokens = seq.key_chain, seq.block_tokens
        for i in range((seq.num_tokens - 1) // self.block_size):
            key = chain[i] if i < len(chain) else self.block_key(seq, i)
            block_id = cached.get(key)
            if block_id is None:
                break
            held = token_ids[block_id]  # (the very tuple, often: no need to compare tokens)
            if held is not block_tokens[i] and held != block_tokens[i]:
                break
            hits.append(block_id)
        return hits

    # -- allocation ------------------------------------------------------------------------
    def _take_free_blocks(self, num_blocks: int) -> list[int]:
        """``num_blocks`` free blocks, each now referenced once (the caller checked the pool
        has them); uncached ones first, then evicting least-recently-used cached ones."""
        free, ref_counts = self._free_uncached, self._ref_counts
        block_ids = [free.popleft() for _ in range(min(num_blocks, len(free)))]
        for block_id in block_ids:
            ref_counts[block_id] = 1
        num_evicted = num_blocks - len(block_ids)
        if num_evicted:
            pop_oldest, entries, cached = self._lru.popleft, self._lru_entries, self._cached
            keys, token_ids, append = self._keys, self._token_ids, block_ids.append
            for _ in range(num_evicted):
                while True:  # skip entries of blocks taken out or appended again since
                    block_id = pop_oldest()
                    later = entries[block_id] = entries[block_id] - 1
                    if not later and not ref_counts[block_id] and keys[block_id] is not None:
                        break
                del cached[keys[block_id]]
                keys[block_id] = token_ids[block_id] = None
                ref_counts[block_id] = 1
                append(block_id)
            self.num_evictions += num_evicted
            self._num_evictable -= num_evicted
        return block_ids

    def _append_evictable(self, block_ids: list[int]) -> None:
        """Make free registered blocks evictable, the last of them the most recently used."""
        lru, entries = self._lru, self._lru_entries
        lru.extend(block_ids)
        for block_id in block_ids:
            entries[block_id] += 1
        self._num_evictable += len(block_ids)
        if len(lru) > 2 * self.num_blocks + 64:
            self._compact_lru()

    def _compact_lru(self) -> None:
        """Drop the skipped entries: keep each evictable block's last entry, in order."""
        ref_counts, keys = self._ref_counts, self._keys
        kept, seen = [], set()
        for block_id in reversed(self._lru):
            if block_id not in seen and not ref_counts[block_id] and keys[block_id] is not None:
                seen.add(block_id)
                kept.append(block_id)
        kept.reverse()
        self._lru = deque(kept)
        self._lru_entries = [0] * self.num_blocks
        for block_id in kept:
            self._lru_entries[block_id] = 1

    def admit(self, seq: Sequence, num_new_tokens: int) -> bool:
        """First allocation of a waiting sequence: reuse its cached prefix, then allocate room
        for `num_new_tokens` more. Sets num_computed_tokens to the cached length. All or
        nothing: on False nothing changed."""
        hits = self.cached_prefix(seq)
        num_cached_tokens = len(hits) * self.block_size
        num_new_tokens = min(num_new_tokens, seq.num_tokens - num_cached_tokens)
        needed = self.blocks_needed(num_cached_tokens + num_new_tokens) - len(hits)
        ref_counts = self._ref_counts
        reusable_free = [ref_counts[b] for b in hits].count(0)
        if needed > self.num_free_blocks - reusable_free:
            return False
        for block_id in hits:  # (a cached block is evictable while nothing references it)
            ref_counts[block_id] += 1
        self._num_evictable -= reusable_free
        seq.block_table += hits
        seq.block_keys += seq.key_chain[: len(hits)]
        seq.block_table += self._take_free_blocks(needed)
        seq.num_computed_tokens = num_cached_tokens
        seq.num_cached_tokens = num_cached_tokens
        return True

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        target = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        return target - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        num_blocks = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        if num_blocks > len(seq.block_table):
            seq.block_table.extend(self._take_free_blocks(num_blocks - len(seq.block_table)))

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Register every block that `num_computed_tokens` now fully covers in the prefix
        cache (called after a step wrote their KV)."""
        keys = seq.block_keys
        first, end = len(keys), seq.num_computed_tokens // self.block_size
        if first >= end:
            return
        if len(seq.key_chain) < end:
            self.block_key(seq, end - 1)
        new_keys = seq.key_chain[first:end]
        keys.extend(new_keys)
        if not self.enable_prefix_caching:
            return
        cached, block_keys, token_ids = self._cached, self._keys, self._token_ids
        for key, block_id, tokens in zip(
            new_keys, seq.block_table[first:end], seq.block_tokens[first:end], strict=True
        ):
            # (one probe of the index: ``setdefault`` returns this very id when it added it)
            if block_keys[block_id] is None and cached.setdefault(key, block_id) is block_id:
                block_keys[block_id] = key
                token_ids[block_id] = tokens

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq`, tail first; resets its table."""
        ref_counts, keys, uncached = self._ref_counts, self._keys, self._free_uncached
        evictable: list[int] = []
        for block_id in reversed(seq.block_table):
            ref_count = ref_counts[block_id] = ref_counts[block_id] - 1
            if ref_count <= 0:
                if ref_count < 0:
                    raise AssertionError(f"block {block_id} released twice")
                if keys[block_id] is None:
                    uncached.append(block_id)
                else:
                    evictable.append(block_id)
        if evictable:
            self._append_evictable(evictable)
        seq.block_table = []
        seq.block_keys = []

    # -- handoff ---------------------------------------------------------------------------
    def cached_block(self, key: BlockKey) -> int | None:
        return self._cached.get(key)

    def touch(self, block_id: int) -> None:
        """Make an evictable block the most recently used."""
        if not self._ref_counts[block_id] and self._keys[block_id] is not None:
            self._num_evictable -= 1  # (counted again as it is appended)
            self._append_evictable([block_id])

    def insert_cached_block(self, key: BlockKey, token_ids: SequenceABC[int]) -> int | None:
        """Reserve a free block to hold an imported block under `key`; returns its id (the
        caller writes the KV bytes) or None when the key is already cached or no block is
        free. The block is left unreferenced and evictable."""
        if key in self._cached or self.num_free_blocks == 0:
            return None
        [block_id] = self._take_free_blocks(1)
        self._ref_counts[block_id] = 0
        self._keys[block_id], self._token_ids[block_id] = key, tuple(token_ids)
        self._cached[key] = block_id
        self._append_evictable([block_id])
        return block_id

    def reserve(self, num_blocks: int) -> list[int]:
        """Up to `num_blocks` free blocks, referenced once by the caller (a KV load): no
        sequence is handed them and no eviction takes them until `release_reserved`."""
        block_ids = self._take_free_blocks(min(num_blocks, self.num_free_blocks))
        self.num_reserved_blocks += len(block_ids)
        return block_ids

    def release_reserved(
        self, block_ids: SequenceABC[int], cached: SequenceABC[tuple[BlockKey, SequenceABC[int]]]
    ) -> None:
        """Drop the caller's reference on reserved blocks; `cached[i]` = (key, tokens) puts
        `block_ids[i]` in the prefix cache first (its bytes were loaded), unless that key is
        already cached by another block."""
        self.num_reserved_blocks -= len(block_ids)
        ref_counts, keys, block_tokens = self._ref_counts, self._keys, self._token_ids
        index, uncached = self._cached, self._free_uncached
        if self.enable_prefix_caching:
            # (``cached`` may cover only the first blocks)
            for block_id, (key, token_ids) in zip(block_ids, cached, strict=False):
                if index.setdefault(key, block_id) is block_id:  # (it was not cached)
                    keys[block_id], block_tokens[block_id] = key, tuple(token_ids)
        evictable: list[int] = []
        for block_id in block_ids:
            ref_count = ref_counts[block_id] = ref_counts[block_id] - 1
            if ref_count != 0:
                raise AssertionError(f"reserved block {block_id} is shared")
            if keys[block_id] is None:
                uncached.append(block_id)
            else:
                evictable.append(block_id)
        if evictable:
            self._append_evictable(evictable)

    def check_invariants(self) -> None:
        uncached = set(self._free_uncached)
        pairs = enumerate(zip(self._ref_counts, self._keys, strict=True))
        evictable = {b for b, (ref_count, key) in pairs if ref_count == 0 and key is not None}
        for block_id, (ref_count, key) in enumerate(zip(self._ref_counts, self._keys, strict=True)):
            if (ref_count == 0) != (block_id in uncached or block_id in evictable):
                raise AssertionError(f"block {block_id} ref_count/free mismatch")
            if key is not None and self._cached.get(key) != block_id:
                raise AssertionError(f"block {block_id} key not indexed")
        if len(self._free_uncached) != len(uncached) or uncached & evictable:
            raise AssertionError("a free block is listed twice")
        if self._num_evictable != len(evictable) or not evictable <= set(self._lru):
            raise AssertionError("an evictable block is not in the LRU order")
        counts = Counter(self._lru)
        if [counts[b] for b in range(self.num_blocks)] != self._lru_entries:
            raise AssertionError("LRU entry counts are off")
