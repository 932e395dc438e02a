"""The simulator: exact timings on tiny cases, the router's own decisions, fast-forward equal
to stepping, admission, and the cost models."""

from __future__ import annotations

import gc
import json
from dataclasses import replace

import pytest

from pdserve.sim.cluster import SimConfig, Simulator, _Flight, _PromptKeys, simulate
from pdserve.sim.costs import CalibratedCost, EngineLimits, Link, StepShape, load_profile
from pdserve.sim.roofline import GPUS, MODELS, min_tp, parse_gpu, roofline
from pdserve.workload.format import Request, WorkloadError
from pdserve.workload.generate import Lengths, synthetic
from pdserve.workload.result import RequestRecord
from services.router import policy

# The exact timelines below use the static threshold rule and no prompt-chunk target.
T = {"disaggregation_policy": "threshold", "decode_target_step_s": None}

# 10 ms per step + 1 ms per token computed: easy to add up by hand.
LINEAR = CalibratedCost("linear", (0.010, 0.001, 0.0, 0.0, 0.0), EngineLimits(64, 16, 8, 64),
                        Link(0.002, 1e6, 100.0, 2), dispatch_s=0.005, prefill_tokens_per_s=1e4)  # fmt: skip


def test_one_local_request_exact_timeline():
    # 100-token prompt, budget 64: chunks of 64 and 36 tokens, then 3 single-token steps.
    res = simulate([Request(0.0, 100, 4)], SimConfig(0, 1, **T), LINEAR)
    r = res["requests"][0]
    ttft = 0.005 + (0.010 + 0.064) + (0.010 + 0.036)
    assert r["route"] == "local"
    assert r["ttft_s"] == pytest.approx(ttft)
    assert r["e2e_s"] == pytest.approx(ttft + 3 * 0.011)
    assert r["tpot_s"] == pytest.approx(0.011)
    assert res["itl_s"]["p50"] == pytest.approx(0.011)


def test_one_disaggregated_request_exact_timeline():
    # Prefill 200 tokens on the prefill replica (64+64+64+8), pipelined handoff of
    # 200 * 100 bytes at 1 MB/s over 2 layers, then decode computes the 8-token tail + token 1.
    res = simulate([Request(0.0, 200, 3)], SimConfig(1, 1, threshold_tokens=128, **T), LINEAR)
    r = res["requests"][0]
    start = 0.005
    end = start + 3 * 0.074 + 0.018
    ready = max(end + 0.002 + 20000 / 2 / 1e6, start + 0.002 + 20000 / 1e6)
    first_step = 0.010 + 0.009  # 8 uncached prompt tokens + the prefill's token
    assert r["route"] == "disaggregated"
    # The decode worker streams the prefill's token as it admits the request (as
    # LLMEngine.emit_first_token does live); its first step then samples token 2.
    assert r["ttft_s"] == pytest.approx(ready)
    assert r["num_output_tokens"] == 3
    assert r["e2e_s"] == pytest.approx(ready + first_step + 0.011)


def test_routes_are_the_router_policy_decisions():
    workload = [Request(i * 0.01, n, 2) for i, n in enumerate((10, 300, 127, 128))]
    res = simulate(workload, SimConfig(1, 1, threshold_tokens=128, **T), LINEAR)
    idle = policy.WorkerLoad("w", 0, 64)
    expected = [policy.decide_disaggregation(n, idle, idle, 128).mode for n in (10, 300, 127, 128)]
    assert [r["route"] for r in res["requests"]] == [
        "disaggregated" if m is policy.PrefillMode.REMOTE else "local" for m in expected
    ]


def test_shared_prefix_is_served_from_the_decode_cache():
    w = [Request(0.0, 96, 2, "sys", 64), Request(1.0, 96, 2, "sys", 64)]
    res = simulate(w, SimConfig(0, 1, **T), LINEAR)
    first, second = res["requests"]
    assert first["ttft_s"] == pytest.approx(0.005 + 0.010 + 0.064 + 0.010 + 0.032)
    assert second["ttft_s"] == pytest.approx(0.005 + 0.010 + 0.032)  # 64 cached tokens


@pytest.mark.parametrize(
    ("num_prefill", "num_blocks", "policy_name"),
    [(0, 64, "cost"), (1, 64, "threshold"), (1, 64, "cost"), (0, 24, "cost"), (2, 40, "cost")],
)
def test_fast_forward_equals_stepping(num_prefill, num_blocks, policy_name):
    cost = replace(LINEAR, limits=EngineLimits(num_blocks, 16, 8, 64),
                   coefficients=(0.004, 2e-5, 1e-4, 1e-8, 2e-6))  # fmt: skip
    w = synthetic(60, 20.0, seed=5, shared_prefix_tokens=32, shared_share=0.4,
                  prompt=Lengths("uniform:8:200"), output=Lengths("uniform:1:40"))  # fmt: skip
    fast = simulate(w, SimConfig(num_prefill, 2, disaggregation_policy=policy_name), cost)
    slow = simulate(w, SimConfig(num_prefill, 2, disaggregation_policy=policy_name,
                                 fast_forward=False), cost)  # fmt: skip
    for a, b in zip(fast["requests"], slow["requests"], strict=True):
        assert a["route"] == b["route"] and a["error"] == b["error"]
        assert a["num_output_tokens"] == b["num_output_tokens"]
        assert a["ttft_s"] == pytest.approx(b["ttft_s"], abs=1e-9)
        assert a["e2e_s"] == pytest.approx(b["e2e_s"], abs=1e-9)
    assert fast["itl_s"] == pytest.approx(slow["itl_s"], abs=1e-9)


def _collector_states_during_run(enabled_before: bool) -> tuple[list[bool], bool]:
    """(gc.isenabled() at every heartbeat of a small run, and after it)."""
    (gc.enable if enabled_before else gc.disable)()
    w = synthetic(5, 20.0, seed=1, prompt=Lengths("uniform:8:40"), output=Lengths("uniform:1:8"))
    sim = Simulator(w, SimConfig(0, 1, **T), LINEAR)
    seen, heartbeat = [], sim._heartbeat
    sim._heartbeat = lambda t: (seen.append(gc.isenabled()), heartbeat(t))
    try:
        sim.run()
        return seen, gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("enabled_before", [True, False])
def test_the_event_loop_pauses_the_cyclic_collector_and_restores_it(enabled_before):
    seen, enabled_after = _collector_states_during_run(enabled_before)
    assert seen and not any(seen) and enabled_after == enabled_before


def test_admission_rejects_above_max_inflight():
    w = [Request(0.0, 20, 50) for _ in range(5)]
    res = simulate(w, SimConfig(0, 1, max_inflight_requests=2, **T), LINEAR)
    errors = [r["error"] for r in res["requests"]]
    assert errors[:2] == [None, None]
    assert all(e.startswith("rejected (queue_full)") for e in errors[2:])
    assert res["num_failed"] == 3


def test_a_prompt_larger_than_the_pool_fails_alone():
    # The router refuses it (its admission's decode_wait_s is None), as the real router does.
    small = replace(LINEAR, limits=EngineLimits(4, 16, 8, 64))
    res = simulate([Request(0.0, 200, 2), Request(0.0, 20, 2)], SimConfig(0, 1, **T), small)
    assert res["requests"][0]["error"].startswith("rejected: prompt + max_tokens needs more KV")
    assert res["requests"][1]["error"] is None


def test_admission_counts_the_decode_workers_wait_for_a_slot():
    # One batch slot; request 0 holds it for 100 tokens at 11 ms a step. The router's
    # admission (admission.decode_wait_s) predicts request 1 waits ~1 s for the slot: past its
    # 0.5 s deadline, it is refused, as the real router refuses it.
    one_slot = replace(LINEAR, limits=EngineLimits(64, 16, 1, 64))
    config = SimConfig(0, 1, deadline_s=0.5, **T)
    res = simulate([Request(0.0, 20, 100), Request(0.2, 20, 2)], config, one_slot)
    assert res["requests"][0]["error"] is None
    assert res["requests"][1]["error"].startswith("rejected (deadline)")
    # With a deadline the wait fits, it is admitted and served after request 0.
    res = simulate([Request(0.0, 20, 100), Request(0.2, 20, 2)], replace(config, deadline_s=5.0),
                   one_slot)  # fmt: skip
    assert res["requests"][1]["error"] is None and res["requests"][1]["ttft_s"] > 0.8


def test_precomputed_block_keys_are_equal_exactly_when_the_token_prefixes_are():
    # (index, group, prefix, prompt, output): no prefix; one group's prefix of 40 and of 48
    # tokens; prompts that are all prefix, of equal and of different lengths; another group.
    shapes = [(0, 0, 0, 70, 30), (1, 0, 0, 70, 30), (2, 1, 40, 90, 9), (3, 1, 40, 41, 20),
              (4, 1, 48, 70, 5), (5, 1, 48, 48, 40), (6, 1, 48, 48, 17), (7, 1, 40, 40, 40),
              (8, 2, 48, 48, 40), (9, 1, 3, 5, 60)]  # fmt: skip
    bs, seqs = 16, []
    for index, group, prefix, prompt, output in shapes:
        keys = _PromptKeys(index, group, prefix, prompt, output, bs)
        tokens = keys.prompt + [0] * output  # the prompt, then outputs of token 0
        assert keys.num_blocks == prompt // bs and len(keys.chain) == len(tokens) // bs
        assert keys.tokens == [
            tuple(tokens[i : i + bs]) for i in range(0, len(keys.chain) * bs, bs)
        ]
        seqs.append((keys.chain, tokens))
    num_equal = 0
    for chain_a, tokens_a in seqs:
        for chain_b, tokens_b in seqs:
            for i in range(min(len(chain_a), len(chain_b))):
                same = tokens_a[: (i + 1) * bs] == tokens_b[: (i + 1) * bs]
                assert (chain_a[i] == chain_b[i]) == same
                num_equal += same and chain_a is not chain_b
    assert num_equal > 0  # some blocks of different requests are shared


def test_shortest_held_output_follows_decode_calls_as_they_start_and_end():
    sim = Simulator([], SimConfig(0, 1), LINEAR)
    flights = [_Flight(Request(0.0, 20, n), RequestRecord(i, 0.0, 20, 0), _PromptKeys(i, 0, 0, 20, n, 16))
               for i, n in enumerate([7, 3, 9] + [50] * 200)]  # fmt: skip
    mins = []
    for f in flights[:3]:
        sim._call_decode("decode-0", f)
        mins.append(sim._min_held_output("decode-0"))
    sim._decode_call_ended("decode-0", flights[1])
    mins.append(sim._min_held_output("decode-0"))
    for f in flights[3:]:  # many calls start and end: the pruned heap keeps the right minimum
        sim._call_decode("decode-0", f)
        sim._decode_call_ended("decode-0", f)
    mins.append(sim._min_held_output("decode-0"))
    sim._decode_call_ended("decode-0", flights[0])
    mins.append(sim._min_held_output("decode-0"))
    sim._decode_call_ended("decode-0", flights[2])
    assert mins + [sim._min_held_output("decode-0")] == [7, 3, 3, 7, 7, 9, 0]
    assert len(sim._held_outputs["decode-0"]) <= 64 + 2


def test_the_router_sees_each_replicas_token_budget_as_it_sees_a_live_workers():
    """A live worker reports its step budget and the router sizes a local prefill's chunks by
    it; a replica's report carries it too (LINEAR's budget: 64 tokens, not the 512 prior)."""
    sim = Simulator([], SimConfig(0, 1), LINEAR)
    sim.decode[0].publish()
    load = sim._loads(sim.decode, _PromptKeys(0, 0, 0, 32, 1, 16))[0]
    assert load.max_step_tokens == LINEAR.limits.max_num_batched_tokens == 64
    assert policy.local_chunk_tokens(replace(load, target_step_s=0.0), 200, sim._costs()) == 64


def test_a_decode_replicas_own_budget_chunks_its_prompts_and_reaches_the_router():
    """``pdserve up`` caps a decode worker beside prefill workers below the prefill worker's
    budget: a decode replica gets its own, a prefill replica keeps the cost model's."""
    config = SimConfig(1, 1, threshold_tokens=1000, decode_max_num_batched_tokens=16, **T)
    sim = Simulator([Request(0.0, 100, 2)], config, LINEAR)
    res = sim.run()
    assert sim.prefill[0].sched.max_num_batched_tokens == 64
    # The 100-token prompt stays local: six 16-token chunks and a 4-token one.
    ttft = 0.005 + 7 * 0.010 + 0.100
    assert res["requests"][0]["route"] == "local"
    assert res["requests"][0]["ttft_s"] == pytest.approx(ttft)
    sim.decode[0].publish()
    assert sim._loads(sim.decode, _PromptKeys(0, 0, 0, 32, 1, 16))[0].max_step_tokens == 16
    assert res["conditions"]["decode_max_num_batched_tokens"] == 16
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SimConfig(1, 1, decode_max_num_batched_tokens=0)


def test_router_load_counts_its_own_calls_when_fresher_than_the_report():
    sim = Simulator([], SimConfig(0, 1), LINEAR)
    sim.inflight["decode-0"] = 3  # three Decode calls since the last heartbeat (reported 0)
    load = sim._loads(sim.decode, _PromptKeys(0, 0, 0, 32, 1, 16))[0]
    assert (load.num_inflight, load.num_running) == (3, 3)


@pytest.mark.parametrize("overlap", [True, False])
def test_overlapped_handoff_reserves_decode_blocks_while_the_prompt_prefills(overlap):
    # A 200-token prompt (12 full blocks) prefills from 5 ms to 245 ms; heartbeats every 10 ms
    # publish the decode worker's free blocks. Overlapped, its KV load reserves the 12 blocks
    # when the router calls Decode (with Prefill); sequential, only when the KV lands.
    seen = []

    class Probe(Simulator):
        def _heartbeat(self, t):
            super()._heartbeat(t)
            seen.append((t, self.decode[0].report["num_free_blocks"]))

    config = SimConfig(1, 1, threshold_tokens=128, staleness_s=0.01, overlap_handoff=overlap, **T)
    sim = Probe([Request(0.0, 200, 3)], config, LINEAR)
    sim.run()
    during = {free for t, free in seen if 0.01 <= t <= 0.24}
    assert during == ({64 - 12} if overlap else {64})
    assert sim.decode[0].num_loading == 0 and sim.decode[0].bm.num_cached_blocks == 12
    sim.decode[0].bm.check_invariants()


def test_a_kv_load_reserving_blocks_mid_stretch_leaves_the_stretch_its_blocks():
    """A decoding sequence fast-forwards over steps that will need new blocks; meanwhile the
    overlapped handoff of a long prompt reserves most of the pool for its KV. The engine
    holds the blocks of the steps it has scheduled, and the reservation takes from the rest:
    the stretch used to count on blocks the reservation had taken and failed to grow
    (IndexError), as ``sim_identity``'s small-pool setup did."""
    config = SimConfig(1, 1, threshold_tokens=128, overlap_handoff=True, **T)
    workload = [Request(0.0, 16, 60), Request(0.1, 960, 4)]
    sim = Simulator(workload, config, LINEAR)
    res = sim.run()
    assert [r["route"] for r in res["requests"]] == ["local", "disaggregated"]
    assert res["num_failed"] == 0
    assert [r["num_output_tokens"] for r in res["requests"]] == [60, 4]
    sim.decode[0].bm.check_invariants()
    assert sim.decode[0].bm.num_free_blocks == LINEAR.limits.num_kv_blocks
    stepped = simulate(workload, replace(config, fast_forward=False), LINEAR)
    for a, b in zip(stepped["requests"], res["requests"], strict=True):
        assert (a["route"], a["num_output_tokens"]) == (b["route"], b["num_output_tokens"])
        assert (a["ttft_s"], a["e2e_s"]) == pytest.approx((b["ttft_s"], b["e2e_s"]), abs=1e-9)


def test_link_is_pipelined_with_prefill():
    link = Link(0.001, 1e9, 1000.0, 10)
    # Compute-bound: only the last layer's 1/10 is left after a 1 s prefill.
    assert link.ready_s(0.0, 1.0, 10_000) == pytest.approx(1.0 + 0.001 + 0.001)
    # Transfer-bound: 10 MB at 1 GB/s takes longer than a 1 ms prefill.
    assert link.ready_s(0.0, 0.001, 10_000) == pytest.approx(0.001 + 0.01)


def test_profile_errors_name_the_field(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"step_fit": {"coefficients": [1, 2]}}))
    with pytest.raises(WorkloadError, match="step_fit.coefficients"):
        load_profile(path)
    path.write_text("{\n  oops")
    with pytest.raises(WorkloadError, match="line 2"):
        load_profile(path)
    good = {"step_fit": {"coefficients": [0.01, 0, 0, 0, 0], "prefill_tokens_per_s": 1000},
            "engine": {"num_kv_blocks": 10, "block_size": 16, "max_num_seqs": 4,
                       "max_num_batched_tokens": 0}}  # fmt: skip
    path.write_text(json.dumps(good, indent=1))  # the field's key is on line 16
    with pytest.raises(WorkloadError) as info:
        load_profile(path)
    assert (info.value.line, info.value.field) == (16, "engine.max_num_batched_tokens")
    assert str(info.value).startswith(f"{path}, line 16: field 'engine.max_num_batched_tokens'")
    del good["engine"]["num_kv_blocks"]  # missing: the line of the enclosing "engine"
    path.write_text(json.dumps(good, indent=1))
    with pytest.raises(WorkloadError, match=r"line 12: field 'engine.num_kv_blocks'"):
        load_profile(path)


def test_profile_adds_the_worker_loop_to_every_step(tmp_path):
    # The stack's calibration: each engine step of a worker costs its loop's overhead too.
    profile = {"step_fit": {"coefficients": [0.01, 0.001, 0, 0, 0], "prefill_tokens_per_s": 1000},
               "engine": {"num_kv_blocks": 10, "block_size": 16, "max_num_seqs": 4,
                          "max_num_batched_tokens": 64},
               "dispatch": {"latency_s": 0.004, "step_overhead_s": 0.003}}  # fmt: skip
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    cost = load_profile(path)
    assert (cost.dispatch_s, cost.worker_overhead_s) == (0.004, 0.003)
    assert float(cost.step_s(StepShape(1, 1, 10, 10))) == pytest.approx(0.01 + 0.001 + 0.003)


def test_engine_step_costs_exclude_the_worker_loop():
    # Streams see the engine step plus the worker loop (11 + 3 ms); the engine's StepCosts, which
    # the worker reports and sizes prompt chunks with, time the engine step alone (11 ms).
    looped = replace(LINEAR, worker_overhead_s=0.003)
    sim = Simulator([Request(0.0, 20, 40)], SimConfig(0, 1, **T), looped)
    res = sim.run()
    assert res["itl_s"]["p50"] == pytest.approx(0.014)
    assert sim.decode[0].step_costs.base_step_s == pytest.approx(0.011)


def test_roofline_regimes_and_sizes():
    h100 = roofline(GPUS["H100"], MODELS["llama-3-8b"])
    gpu, model = h100.gpu, h100.model
    weights_s = model.num_params * 2 / (gpu.hbm_bytes_per_s * gpu.bandwidth_efficiency)
    # Decode of one token at short context: bound by reading the weights.
    assert float(h100.step_s(StepShape(1, 1, 1, 1))) == pytest.approx(
        weights_s + gpu.step_overhead_s, rel=1e-3)  # fmt: skip
    # A 4,096-token prefill: bound by compute.
    flops = 2 * model.num_layers * model.layer_params * 4096
    assert float(h100.step_s(StepShape(4096, 1, 4096 * 4097 / 2, 4096))) > flops / (
        gpu.peak_flops * gpu.compute_efficiency)  # fmt: skip
    assert (min_tp(GPUS["H100"], MODELS["llama-3-70b"]), min_tp(GPUS["H200"], MODELS["llama-3-70b"]),
            min_tp(GPUS["B200"], MODELS["llama-3-70b"])) == (4, 2, 2)  # fmt: skip
    assert model.kv_bytes_per_token == 131072  # 32 layers x 2 x 8 heads x 128 x 2 bytes
    assert parse_gpu("H200=5.0").price_per_hour == 5.0
    custom = parse_gpu("X1:500:2:96:400:25:3.5")
    assert (custom.peak_flops, custom.hbm_bytes, custom.price_per_hour) == (500e12, 96e9, 3.5)


def test_a_request_waits_for_blocks_an_overlapped_load_reserves():
    # The 200-token prompt's overlapped handoff reserves 12 of the decode worker's 16 blocks
    # while it prefills; the local 100-token request arriving then needs 7. It waits for them,
    # as the engine does, instead of failing as if it could never fit.
    small = replace(LINEAR, limits=EngineLimits(16, 16, 8, 64))
    config = SimConfig(1, 1, threshold_tokens=128, overlap_handoff=True, deadline_s=60.0, **T)
    res = simulate([Request(0.0, 200, 3), Request(0.01, 100, 2)], config, small)
    assert [r["error"] for r in res["requests"]] == [None, None]
