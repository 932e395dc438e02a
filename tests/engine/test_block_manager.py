"""Exact block ids, refcounts and eviction order on tiny pools."""

import pytest

from pdserve.engine.block_hash import chain_block_keys, next_block_key, root_key
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import FinishReason, Sequence

ROOT = root_key("test-model")


def make_seq(rid: str, tokens: list[int], salt: str | None = None) -> Sequence:
    root = root_key("test-model", salt) if salt else ROOT
    return Sequence(rid, list(tokens), max_tokens=8, root_key=root, arrival_index=0)


def test_block_keys_chain_and_salt():
    tokens = list(range(40))
    keys = chain_block_keys(tokens, 16, ROOT)
    assert len(keys) == 2  # the trailing 8 tokens make no full block
    assert keys[0] == next_block_key(ROOT, tokens[:16])
    assert keys[1] == next_block_key(keys[0], tokens[16:32])
    assert all(len(k) == 16 for k in keys)
    salted = chain_block_keys(tokens, 16, root_key("test-model", "tenant-a"))
    assert not set(keys) & set(salted)
    # the same block content under a different prefix gets a different key
    assert chain_block_keys(tokens[16:32], 16, ROOT)[0] != keys[1]


def test_admit_allocates_and_free_returns_all():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq("a", list(range(10)))
    assert bm.admit(seq, num_new_tokens=10)
    assert seq.block_table == [0, 1, 2]
    assert bm.num_free_blocks == 1
    seq.num_computed_tokens = 10
    bm.commit_full_blocks(seq)
    assert len(seq.block_keys) == 2 and bm.num_cached_blocks == 2
    bm.free(seq)
    bm.check_invariants()
    assert bm.num_free_blocks == 4
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_hit_reuses_blocks_and_leaves_last_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_seq("a", list(range(12)))
    bm.admit(first, 12)
    first.num_computed_tokens = 12
    bm.commit_full_blocks(first)
    bm.free(first)
    second = make_seq("b", list(range(12)) + [99])
    assert bm.admit(second, 100)
    assert second.num_cached_tokens == 12
    assert second.block_table[:3] == first_blocks(bm, list(range(12)))
    # Whole-prompt hit: the last block is recomputed, never served from cache.
    third = make_seq("c", list(range(12)))
    assert bm.admit(third, 100)
    assert third.num_cached_tokens == 8
    assert bm.blocks[second.block_table[0]].ref_count == 2


def first_blocks(bm: BlockManager, tokens: list[int]) -> list[int]:
    return [bm.cached_block(k) for k in chain_block_keys(tokens, bm.block_size, ROOT)]


def test_salted_requests_do_not_share_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq("a", list(range(9)), salt="tenant-a")
    bm.admit(a, 9)
    a.num_computed_tokens = 9
    bm.commit_full_blocks(a)
    b = make_seq("b", list(range(9)), salt="tenant-b")
    bm.admit(b, 9)
    assert b.num_cached_tokens == 0


def test_lru_eviction_order_uncached_first_then_oldest_tail_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq("a", [1, 2, 3, 4])
    bm.admit(a, 4)  # blocks 0, 1
    a.num_computed_tokens = 4
    bm.commit_full_blocks(a)
    bm.free(a)  # evictable, tail first: 1 then 0
    b = make_seq("b", [7, 8, 9])
    bm.admit(b, 3)  # takes the two never-used blocks 2, 3
    assert b.block_table == [2, 3]
    c = make_seq("c", [5, 6, 5, 6])
    bm.admit(c, 4)  # must evict: block 1 (a's tail) goes before block 0 (a's head)
    assert c.block_table == [1, 0]
    assert bm.num_evictions == 2
    bm.check_invariants()


def test_block_views_and_cached_keys_follow_the_pool():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq("a", [1, 2, 3, 4, 5])
    bm.admit(a, 5)  # blocks 0, 1, 2
    a.num_computed_tokens = 5
    bm.commit_full_blocks(a)
    assert [(b.block_id, b.ref_count, b.key) for b in bm.blocks] == [
        (0, 1, a.block_keys[0]),
        (1, 1, a.block_keys[1]),
        (2, 1, None),
        (3, 0, None),
    ]
    assert bm.cached_keys() == a.block_keys  # block id order
    with pytest.raises(AttributeError):  # a view: the pool's state changes only through it
        bm.blocks[0].ref_count = 5
    keys = list(a.block_keys)
    bm.free(a)
    c = make_seq("c", [7, 8, 7, 8, 7, 8])
    bm.admit(c, 6)  # the two uncached blocks (3, then 2), then evicts block 1
    assert c.block_table == [3, 2, 1]
    assert bm.cached_keys() == keys[:1]
    assert [b.ref_count for b in bm.blocks] == [0, 1, 1, 1]
    bm.check_invariants()


def test_key_hit_with_different_tokens_is_a_miss():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq("a", [1, 2, 3])
    bm.admit(a, 3)
    a.num_computed_tokens = 3
    bm.commit_full_blocks(a)
    key = a.block_keys[0]
    assert bm.lookup(key, [1, 2]) == a.block_table[0]
    assert bm.lookup(key, [1, 9]) is None


def test_scheduler_chunks_prefill_under_token_budget_and_decodes_first():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=8)
    short = make_seq("short", [1, 2, 3])
    long = make_seq("long", list(range(20)))
    sched.add(short)
    sched.add(long)
    plan = sched.schedule()
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in plan.chunks] == [
        ("short", 0, 3),
        ("long", 0, 5),
    ]
    assert [c.samples for c in plan.chunks] == [True, False]
    sched.update(plan, {"short": 42})
    plan = sched.schedule()
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in plan.chunks] == [
        ("short", 3, 1),
        ("long", 5, 7),
    ]


def test_preemption_frees_blocks_and_requeues_newest_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = make_seq("a", [1, 2, 3]), make_seq("b", [4, 5, 6])
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert len(plan.chunks) == 2 and bm.num_free_blocks == 0
    sched.update(plan, {"a": 7, "b": 8})  # 4 tokens each: still 2 blocks
    plan = sched.schedule()
    sched.update(plan, {"a": 9, "b": 10})  # 5 tokens each → a third block each
    plan = sched.schedule()
    assert [s.request_id for s in plan.preempted] == ["b"]
    assert [c.seq.request_id for c in plan.chunks] == ["a"]
    assert b.num_computed_tokens == 0 and b.block_table == [] and sched.waiting[0] is b
    sched.finish(a, FinishReason.ABORT)
    sched.finish(b, FinishReason.ABORT)
    bm.check_invariants()
    assert bm.num_free_blocks == 4


def test_finish_twice_is_harmless():
    bm = BlockManager(num_blocks=4, block_size=2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a = make_seq("a", [1, 2, 3])
    sched.add(a)
    sched.schedule()
    sched.finish(a, FinishReason.ABORT)
    sched.finish(a, FinishReason.ABORT)
    assert bm.num_free_blocks == 4


def test_invalid_sizes_rejected():
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        Scheduler(BlockManager(4, 4), max_num_seqs=0, max_num_batched_tokens=8)


def test_block_keys_are_hashed_once_per_sequence_and_equal_the_chain():
    calls = []

    def counting_key(parent, tokens):
        calls.append(tuple(tokens))
        return next_block_key(parent, tokens)

    bm = BlockManager(num_blocks=8, block_size=4, key_fn=counting_key)
    tokens = list(range(13))
    seq = make_seq("a", tokens)
    assert bm.admit(seq, 13) and calls == [(0, 1, 2, 3)]  # a miss costs one hash
    seq.num_computed_tokens = 13
    bm.commit_full_blocks(seq)
    assert seq.block_keys == chain_block_keys(tokens, 4, ROOT) and len(calls) == 3
    # Each block's tokens are built once, beside its key, and are what the cache stores.
    assert seq.block_tokens == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)]
    assert all(
        bm.blocks[b].token_ids is t
        for b, t in zip(seq.block_table[:3], seq.block_tokens, strict=True)
    )
    # A preempted sequence re-admitted: its keys come from its chain, not from hashing again.
    bm.free(seq)
    seq.num_computed_tokens = 0
    assert bm.admit(seq, 13) and seq.num_computed_tokens == 12 and len(calls) == 3


def test_sequences_compare_by_identity():
    a, b = make_seq("x", [1, 2, 3]), make_seq("x", [1, 2, 3])
    running = [a, b]
    running.remove(b)
    assert running == [a] and running[0] is a and a != b


def test_lru_order_skips_hit_and_touched_blocks_exactly():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = make_seq("a", [1, 2, 3, 4]), make_seq("b", [5, 6, 7, 8])
    for seq in (a, b):
        bm.admit(seq, 4)  # a: blocks 0, 1; b: blocks 2, 3
        seq.num_computed_tokens = 4
        bm.commit_full_blocks(seq)
    b_head = b.block_keys[0]
    bm.free(a)
    bm.free(b)  # LRU, oldest first: 1, 0, 3, 2
    c = make_seq("c", [1, 2, 3, 4, 9])
    assert bm.admit(c, 5)  # hits 0 and 1 (out of the LRU), evicts 3, the oldest left
    assert c.block_table == [0, 1, 3] and bm.num_evictions == 1
    bm.touch(0)  # referenced: not evictable, nothing moves
    bm.free(c)  # block 3 holds no full block: uncached; LRU: 2, 1, 0
    bm.touch(2)  # LRU: 1, 0, 2
    bm.check_invariants()
    d = make_seq("d", [7] * 6)
    assert bm.admit(d, 6)  # the uncached block, then evicts 1 and 0
    assert d.block_table == [3, 1, 0] and bm.num_evictions == 3
    assert bm.cached_keys() == [b_head]  # block 2
    bm.check_invariants()


def test_lru_stays_bounded_and_ordered_under_hits_without_eviction():
    bm = BlockManager(num_blocks=3, block_size=2)
    for i in range(200):  # each hit and release leaves one skipped entry behind
        seq = make_seq(str(i), [1, 2, 3, 4, 5])
        assert bm.admit(seq, 5)
        seq.num_computed_tokens = 5
        bm.commit_full_blocks(seq)
        bm.free(seq)  # LRU: 2 (uncached, not listed), then 1, 0
        assert len(bm._lru) <= 2 * bm.num_blocks + 64
    bm.check_invariants()
    e = make_seq("e", [8] * 6)
    assert bm.admit(e, 6)
    assert e.block_table == [2, 1, 0]  # uncached first, then the tail before the head
