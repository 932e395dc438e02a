"""Router policy: pure functions, exact expectations on tiny inputs."""

from __future__ import annotations

import dataclasses

import pytest

from services.router.affinity import PrefixAffinity
from services.router.policy import (
    CostModel,
    PrefillMode,
    Weights,
    WorkerLoad,
    admit,
    choose_worker,
    decide_disaggregation,
    local_chunk_tokens,
    local_step_s,
    local_tpot_s,
    plan_route,
    predict_local_ttft_s,
    predict_remote_ttft_s,
    predict_ttft_s,
    score,
    worker_load,
)

W = Weights(overlap=1.0, load=1.0)


def test_score_is_cached_share_minus_load_ratio():
    w = WorkerLoad("d0", num_inflight=16, capacity=64, cached_tokens=768)
    assert score(w, 1024, W) == pytest.approx(0.75 - 0.25)
    assert score(w, 1024, Weights(overlap=2.0, load=0.5)) == pytest.approx(1.5 - 0.125)
    # cached tokens are capped at the prompt length; an empty prompt has no overlap
    assert score(WorkerLoad("d", 0, 8, cached_tokens=99), 10, W) == 1.0
    assert score(WorkerLoad("d", 4, 8), 0, W) == -0.5


def test_choose_prefers_prefix_holder_unless_overloaded():
    a = WorkerLoad("a", num_inflight=2, capacity=64, cached_tokens=0)
    b = WorkerLoad("b", num_inflight=10, capacity=64, cached_tokens=512)
    choice = choose_worker([a, b], 1024, W)
    assert (choice.worker_id, choice.cached_tokens) == ("b", 512)
    assert choice.score == pytest.approx(0.5 - 10 / 64)
    busy_b = WorkerLoad("b", num_inflight=60, capacity=64, cached_tokens=512)
    assert choose_worker([a, busy_b], 1024, W).worker_id == "a"


def test_choose_ties_break_on_load_then_id_and_exclude():
    a = WorkerLoad("a", 1, 4)
    b = WorkerLoad("b", 1, 4)
    c = WorkerLoad("c", 0, 4)
    assert choose_worker([b, a], 100, W).worker_id == "a"
    assert choose_worker([b, a, c], 100, W).worker_id == "c"
    assert choose_worker([a, b], 100, W, exclude=["a"]).worker_id == "b"
    assert choose_worker([a], 100, W, exclude=["a"]) is None
    assert choose_worker([], 100, W) is None
    # equal score, different load ratio: the score already includes load, so craft one
    x = WorkerLoad("x", 2, 4, cached_tokens=50)  # 0.5 - 0.5 = 0
    y = WorkerLoad("y", 0, 4, cached_tokens=0)  # 0 - 0 = 0
    assert choose_worker([x, y], 100, W).worker_id == "y"


def test_disaggregation_threshold_and_colocated():
    idle_p = WorkerLoad("p", 0, 64)
    d = decide_disaggregation(100, WorkerLoad("d", 0, 64), idle_p, 128)
    assert (d.mode, d.uncached_tokens, d.reason) == (
        PrefillMode.LOCAL, 100, "uncached suffix 100 < threshold 128",
    )  # fmt: skip
    d = decide_disaggregation(1000, WorkerLoad("d", 0, 64), idle_p, 128)
    assert (d.mode, d.uncached_tokens, d.reason) == (
        PrefillMode.REMOTE, 1000, "uncached suffix 1000 >= threshold 128",
    )  # fmt: skip
    d = decide_disaggregation(1000, WorkerLoad("d", 0, 64, cached_tokens=960), idle_p, 128)
    assert (d.mode, d.uncached_tokens) == (PrefillMode.LOCAL, 40)
    assert d.reason == "uncached suffix 40 < threshold 128; decode worker holds 960 tokens"
    d = decide_disaggregation(5000, WorkerLoad("d", 0, 64), None, 128)
    assert (d.mode, d.reason) == (PrefillMode.LOCAL, "colocated: no prefill workers")
    assert (
        decide_disaggregation(128, WorkerLoad("d", 0, 64), idle_p, 128).mode is PrefillMode.REMOTE
    )


# Round numbers: 1,000 prompt tokens/s everywhere, 40 ms decode steps, 50 ms handoff, a
# 100 ms step target (so 60-token chunks next to decodes), no drain time.
COSTS = CostModel(
    prefill_tokens_per_s=1000.0, decode_step_s=0.04, max_chunk_tokens=512,
    handoff_s=0.05, handoff_s_per_token=0.0, tpot_slo_s=0.15, target_step_s=0.1,
    prompt_drain_s=None,
)  # fmt: skip
BUSY = WorkerLoad("d", 8, 64, num_running=8, step_s=0.04, prompt_tokens_per_s=1000.0)


def test_cost_local_chunks_are_the_decode_workers_own_budget():
    assert local_chunk_tokens(BUSY, 600, COSTS) == 60  # (0.1 - 0.04) s * 1000 tokens/s
    assert local_step_s(BUSY, 600, COSTS) == pytest.approx(0.1)
    # 600 tokens: 0.6 s of compute plus ten 40 ms decode steps around its chunks
    assert predict_local_ttft_s(BUSY, 600, COSTS) == pytest.approx(0.6 + 10 * 0.04)
    idle = WorkerLoad("d", 0, 64)
    assert predict_local_ttft_s(idle, 500, COSTS) == pytest.approx(0.04 + 0.5)  # one step
    # beyond the worker's budget (512, the prior) an idle worker needs a second step
    assert predict_local_ttft_s(idle, 600, COSTS) == pytest.approx(2 * 0.04 + 0.6)
    # a worker that reports a drain time grows its chunks to compute its queue in time
    draining = dataclasses.replace(BUSY, prompt_drain_s=1.0)
    assert local_chunk_tokens(draining, 600, COSTS) == 60  # 600 * 0.04 / (1 - 0.6)
    assert local_chunk_tokens(draining, 900, COSTS) == 360  # 900 * 0.04 / (1 - 0.9)
    # and one without a step target prefills in steps as large as its token budget
    assert local_chunk_tokens(dataclasses.replace(BUSY, target_step_s=0.0), 600, COSTS) == 512


def test_cost_local_chunks_never_exceed_the_budget_the_decode_worker_reports():
    """A decode worker capped at 128 tokens a step prefills a long
    prompt in 128-token chunks, whatever the router's prior for an unreported budget."""
    report = {"running": 8, "step_s": 0.04, "prompt_tokens_per_s": 1000.0,
              "target_step_s": 0.0, "prompt_drain_s": 0.0, "max_num_batched_tokens": 128}  # fmt: skip
    capped = worker_load("d", report, 64)
    assert capped.max_step_tokens == 128
    assert local_chunk_tokens(capped, 600, COSTS) == 128
    assert local_step_s(capped, 600, COSTS) == pytest.approx(0.04 + 0.128)
    idle = dataclasses.replace(capped, num_running=0, num_inflight=0)
    assert predict_local_ttft_s(idle, 600, COSTS) == pytest.approx(5 * 0.04 + 0.6)  # 5 chunks
    draining = dataclasses.replace(capped, prompt_drain_s=1.0)
    assert local_chunk_tokens(draining, 900, COSTS) == 128  # the drain grows it up to the cap
    unreported = worker_load(
        "d", {k: v for k, v in report.items() if k != "max_num_batched_tokens"}, 64
    )
    assert unreported.max_step_tokens is None
    assert local_chunk_tokens(unreported, 600, COSTS) == 512


def test_cost_a_prompt_steps_fixed_cost_counts_once_per_chunk():
    """A CPU decode worker on 4-bit weights pays ~90 ms for any step carrying prompt tokens."""
    costly = dataclasses.replace(BUSY, step_s=0.05, prompt_step_s=0.09, prompt_drain_s=0.6)
    chunk = local_chunk_tokens(costly, 256, COSTS)  # the 100 ms target holds no chunk: drain
    assert chunk == 105  # 256 * (0.05 + 0.09) / (0.6 - 0.256), rounded up
    assert predict_local_ttft_s(costly, 256, COSTS) == pytest.approx(3 * 0.14 + 0.256)
    idle = WorkerLoad("d", 0, 64, step_s=0.05, prompt_step_s=0.09, prompt_tokens_per_s=1000.0)
    assert predict_local_ttft_s(idle, 256, COSTS) == pytest.approx(0.14 + 0.256)
    prefill = WorkerLoad("p", 0, 64, prompt_step_s=0.09, prompt_tokens_per_s=1000.0)
    assert predict_remote_ttft_s(prefill, 256, COSTS) == pytest.approx(0.09 + 0.256 + 0.05)


def test_cost_tpot_of_running_streams_is_their_average_over_their_output():
    """One slow step among 32 tokens costs a stream little of its time per token; without
    output lengths the step itself must stay within the SLO."""
    costly = dataclasses.replace(BUSY, step_s=0.05, prompt_step_s=0.09, prompt_drain_s=0.6)
    assert local_tpot_s(costly, 256, COSTS) == pytest.approx(local_step_s(costly, 256, COSTS))
    assert local_tpot_s(costly, 256, COSTS) > COSTS.tpot_slo_s
    streams = dataclasses.replace(costly, min_output_tokens=32)
    assert local_tpot_s(streams, 256, COSTS) == pytest.approx(0.05 + (3 * 0.09 + 0.256) / 31)
    burst = WorkerLoad("p", 2, 64, queued_prefill_tokens=512, prompt_tokens_per_s=1000.0)
    d = decide_disaggregation(256, streams, burst, 128, COSTS)
    assert (d.mode, d.reason_class) == (PrefillMode.LOCAL, "local_faster")
    d = decide_disaggregation(256, costly, burst, 128, COSTS)
    assert (d.mode, d.reason_class) == (PrefillMode.REMOTE, "local_breaks_tpot_slo")


def test_cost_idle_decode_worker_prefills_locally():
    d = decide_disaggregation(500, WorkerLoad("d", 0, 64), WorkerLoad("p", 0, 64), 128, COSTS)
    assert (d.mode, d.reason_class) == (PrefillMode.LOCAL, "local_faster")
    assert d.predicted_local_ttft_s == pytest.approx(0.54)
    assert d.predicted_remote_ttft_s == pytest.approx(0.55)
    assert d.reason.startswith("local is faster: predicted TTFT local 0.540s, remote 0.550s")


def test_cost_an_idle_decode_worker_prefills_past_its_budget_in_several_steps():
    """600 tokens on a worker whose steps hold 512 take two steps: 0.68 s, not one of 0.64 s,
    and the prefill worker's 0.65 s wins."""
    d = decide_disaggregation(600, WorkerLoad("d", 0, 64), WorkerLoad("p", 0, 64), 128, COSTS)
    assert (d.mode, d.reason_class) == (PrefillMode.REMOTE, "remote_faster")
    assert d.predicted_local_ttft_s == pytest.approx(0.68)


def test_cost_busy_decode_worker_hands_off_to_an_idle_prefill_worker():
    d = decide_disaggregation(600, BUSY, WorkerLoad("p", 0, 64), 128, COSTS)
    assert (d.mode, d.reason_class) == (PrefillMode.REMOTE, "remote_faster")
    assert d.predicted_local_ttft_s == pytest.approx(1.0)
    assert d.predicted_remote_ttft_s == pytest.approx(0.65)


def test_cost_queued_prefill_worker_loses_to_the_decode_worker():
    queued = WorkerLoad("p", 3, 64, queued_prefill_tokens=2000, prompt_tokens_per_s=1000.0)
    d = decide_disaggregation(600, BUSY, queued, 128, COSTS)
    assert (d.mode, d.reason_class) == (PrefillMode.LOCAL, "local_faster")
    assert d.predicted_remote_ttft_s == pytest.approx(2.65)
    # the prefill worker's cached prefix shortens its work
    warm = WorkerLoad("p", 3, 64, cached_tokens=512, queued_prefill_tokens=200)
    assert decide_disaggregation(600, BUSY, warm, 128, COSTS).mode is PrefillMode.REMOTE


def test_cost_local_is_ruled_out_when_its_step_breaks_the_tpot_slo():
    slow = WorkerLoad("d", 8, 64, num_running=8, step_s=0.14, prompt_tokens_per_s=1000.0)
    assert local_step_s(slow, 600, COSTS) == pytest.approx(0.14 + 0.032)  # the floor chunk
    queued = WorkerLoad("p", 3, 64, queued_prefill_tokens=5000)
    d = decide_disaggregation(600, slow, queued, 128, COSTS)
    assert (d.mode, d.reason_class) == (PrefillMode.REMOTE, "local_breaks_tpot_slo")


def test_worker_load_takes_the_fresher_of_the_report_and_the_routers_own_counts():
    report = {"running": 2, "waiting": 1, "pending_prompt_tokens": 300, "step_s": 0.05,
              "prompt_step_s": 0.09, "prompt_tokens_per_s": 700.0, "target_step_s": 0.1,
              "prompt_drain_s": 0.0}  # fmt: skip
    w = worker_load("d", report, 64, own_inflight=5, own_queued_tokens=100, min_output_tokens=32)
    assert (w.num_inflight, w.num_running, w.queued_prefill_tokens) == (5, 5, 300)
    assert (w.step_s, w.prompt_step_s, w.prompt_tokens_per_s) == (0.05, 0.09, 700.0)
    assert (w.target_step_s, w.prompt_drain_s, w.min_output_tokens) == (0.1, 0.0, 32)
    bare = worker_load("d", {}, 64)
    assert bare.target_step_s is None and bare.prompt_drain_s is None  # the priors apply


def test_plan_route_uses_the_cost_model_when_given():
    busy = [WorkerLoad("d0", 8, 64, num_running=8, step_s=0.04, prompt_tokens_per_s=1000.0)]
    prefill = [WorkerLoad("p0", 0, 64)]
    plan = plan_route(busy, prefill, 600, W, 128, costs=COSTS)
    assert plan.prefill.worker_id == "p0"
    plan = plan_route([WorkerLoad("d0", 0, 64)], prefill, 500, W, 128, costs=COSTS)
    assert plan.prefill is None and plan.uncached_tokens == 500


def test_plan_route_end_to_end():
    decode = [WorkerLoad("d0", 0, 64), WorkerLoad("d1", 0, 64, cached_tokens=1024)]
    prefill = [WorkerLoad("p0", 0, 64), WorkerLoad("p1", 0, 64, cached_tokens=512)]
    plan = plan_route(decode, prefill, 2048, W, 128)
    assert plan.decode.worker_id == "d1"
    assert plan.disaggregation.mode is PrefillMode.REMOTE
    assert plan.prefill.worker_id == "p1"
    assert plan.uncached_tokens == 2048 - 512
    # the first prefill worker failed: the retry excludes it
    plan = plan_route(decode, prefill, 2048, W, 128, exclude_prefill=["p1"])
    assert plan.prefill.worker_id == "p0"
    assert plan.uncached_tokens == 2048
    # every prefill worker excluded: prefill on the decode worker
    plan = plan_route(decode, prefill, 2048, W, 128, exclude_prefill=["p0", "p1"])
    assert plan.prefill is None and plan.uncached_tokens == 1024
    assert plan_route([], prefill, 10, W, 128) is None


def test_admission():
    assert admit(3, 4, 0.5, 10.0, 1000, 2000.0).admitted
    full = admit(4, 4, 0.5, 10.0, 5000, 2000.0)
    assert (full.admitted, full.reason, full.retry_after_s) == (
        False, "router is full (4/4 requests)", 3,
    )  # fmt: skip
    late = admit(0, 4, predict_ttft_s(9000, 1000, 2000.0), 2.0, 9000, 2000.0)
    assert (late.admitted, late.retry_after_s) == (False, 5)
    assert late.reason == "predicted time to first token 5.00s exceeds the deadline 2.00s"
    assert admit(0, 4, 0.0, 1.0, 0, 2000.0).retry_after_s == 0


def test_prefix_affinity_lru():
    aff = PrefixAffinity(capacity_blocks=3)
    k = [bytes([i]) * 16 for i in range(5)]
    aff.record("d0", k[:2])
    aff.record("d1", k[:1])
    assert aff.prefix_blocks("d0", k) == 2
    assert aff.prefix_blocks("d1", k) == 1
    assert aff.prefix_blocks("d2", k) == 0
    aff.record("d1", k[2:4])  # k0 was refreshed by d1; k1 is now the least recent: evicted
    assert len(aff) == 3
    assert aff.prefix_blocks("d0", k) == 1
    aff.forget_worker("d0")
    assert aff.prefix_blocks("d0", k) == 0


def test_prefill_rate_prior_follows_long_prefills_only():
    from services.router.policy import observe_prefill_rate

    assert observe_prefill_rate(2000.0, 1000, 1.0) == pytest.approx(2000.0 - 0.2 * 1000)
    assert observe_prefill_rate(2000.0, 63, 0.001) == 2000.0  # too short to tell
    assert observe_prefill_rate(2000.0, 500, 0.0) == 2000.0
