"""How `pdserve up` sizes its pools and places its engine workers (pdserve/cpu_layout.py)."""

from __future__ import annotations

from pdserve.cpu_layout import WorkerCpus, choose_pools, describe, lay_out


def sizes(pools) -> tuple[int, int]:
    return pools.num_prefill, pools.num_decode


def test_one_core_runs_colocated_and_two_or_more_split():
    assert sizes(choose_pools(1, None, None)) == (0, 1)
    assert choose_pools(1, None, None).reason == "1 cores < 2: colocated"
    assert sizes(choose_pools(2, None, None)) == (1, 1)
    assert sizes(choose_pools(8, None, None)) == (1, 1)
    assert sizes(choose_pools(2, 0, None)) == (0, 1)  # one flag given: the other is sized
    assert (
        choose_pools(2, 1, None).reason == "--prefill as requested, the other pool sized to 2 cores"
    )
    assert choose_pools(2, 1, 3) == choose_pools(64, 1, 3)  # both given: as requested


def test_each_engine_worker_gets_its_own_cores_decode_first_for_the_remainder():
    workers = [("prefill-0", "prefill"), ("decode-0", "decode"), ("decode-1", "decode")]
    layout = lay_out(workers, range(8), {})
    assert layout == {
        "prefill-0": WorkerCpus(frozenset({0, 1}), 2),
        "decode-0": WorkerCpus(frozenset({2, 3, 4}), 3),
        "decode-1": WorkerCpus(frozenset({5, 6, 7}), 3),
    }
    assert describe(layout) == (
        "prefill-0: 2 threads on cpu 0-1; decode-0: 3 threads on cpu 2-4; "
        "decode-1: 3 threads on cpu 5-7"
    )


def test_more_workers_than_cores_run_unpinned_with_one_thread():
    layout = lay_out([("prefill-0", "prefill"), ("decode-0", "decode")], [0], {})
    assert set(layout.values()) == {WorkerCpus(frozenset(), 1)}
    assert describe(layout) == "prefill-0: 1 thread, unpinned; decode-0: 1 thread, unpinned"


def test_a_pinned_role_keeps_its_set_and_the_rest_share_what_is_left():
    workers = [("prefill-0", "prefill"), ("decode-0", "decode")]
    layout = lay_out(workers, [0, 1, 2, 3], {"prefill": {0}})
    assert layout["prefill-0"] == WorkerCpus(frozenset({0}), 1)
    assert layout["decode-0"] == WorkerCpus(frozenset({1, 2, 3}), 3)
    assert describe({"d": WorkerCpus(frozenset({0, 2, 3}), 3)}) == "d: 3 threads on cpu 0,2-3"
