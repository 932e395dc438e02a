"""Calibration from the live workers' own steps: the step log, the live fit, and what the
simulator does with it (the prefill worker's and the contention factors, a handed-off
request admitted after the step in flight, a run started from a stack's learned state)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np
import pytest

from pdserve.engine import step_log
from pdserve.engine.step_costs import StepCosts
from pdserve.sim import profile as prof
from pdserve.sim.cluster import SimConfig, Simulator, simulate
from pdserve.sim.costs import CalibratedCost, EngineLimits, Link, StepShape, load_profile
from pdserve.workload.format import Request, WorkloadError
from pdserve.workload.generate import Lengths, synthetic

LINEAR = CalibratedCost("linear", (0.010, 0.001, 0.0, 0.0, 0.0), EngineLimits(64, 16, 8, 64),
                        Link(0.002, 1e6, 100.0, 2), dispatch_s=0.005, prefill_tokens_per_s=1e4)  # fmt: skip
T = {"disaggregation_policy": "threshold", "decode_target_step_s": None}


@dataclass
class _Chunk:
    start: int
    num_tokens: int
    is_decode: bool


@dataclass
class _Plan:
    chunks: list


def _learned() -> StepCosts:
    costs = StepCosts()
    for prompt, decodes, seconds in ((0, 2, 0.05), (100, 1, 0.2), (300, 0, 0.5), (0, 3, 0.06)):
        costs.record(prompt, decodes, seconds)
    return costs


def test_step_costs_state_round_trips_exactly():
    costs = _learned()
    again = StepCosts.from_state(json.loads(json.dumps(costs.state())))
    assert again.report() == costs.report()
    costs.record(200, 2, 0.4)
    again.record(200, 2, 0.4)
    assert again.state() == costs.state()


def test_record_of_a_plan_has_the_simulators_shape():
    plan = _Plan([_Chunk(10, 1, True), _Chunk(0, 32, False), _Chunk(64, 16, False)])
    r = step_log.record_of(plan, 5.0, 0.25, True, _learned(), "decode")
    assert (r.num_tokens, r.num_seqs, r.num_prompt_tokens, r.num_decodes) == (49, 3, 48, 1)
    assert r.attended_pairs == 1 * (10 + 1) + 32 * (0 + 16.5) + 16 * (64 + 8.5)
    assert r.context_tokens == 11 + 32 + 80
    assert (r.t, r.engine_s, r.after_wait, r.role) == (5.0, 0.25, True, "decode")


def _rec(t, engine_s, after_wait=False, tokens=1, seqs=1, role="decode", costs=(0.0,) * 8):
    return step_log.StepRecord(t, tokens, seqs, 0.0, 0, tokens - seqs, seqs,
                               engine_s, after_wait, tuple(costs), role)  # fmt: skip


def test_log_written_and_read_back_by_time_a_torn_line_skipped(tmp_path):
    path = tmp_path / "steps.jsonl"
    writer = step_log.StepLogWriter(path)
    for t in (1.0, 2.0, 3.0):
        writer.write(_rec(t, 0.1))
    writer.close()
    with open(path, "a") as f:
        f.write('{"t": 4.0, "num_tok')  # a worker killed mid-line
    assert [r.t for r in step_log.read(path)] == [1.0, 2.0, 3.0]
    assert [r.t for r in step_log.read(path, since_s=2.0, until_s=3.0)] == [2.0]
    assert step_log.read(path)[0] == _rec(1.0, 0.1)


def test_loop_overhead_only_between_consecutive_steps():
    records = [_rec(0.0, 0.1), _rec(0.102, 0.1), _rec(5.0, 0.1, after_wait=True), _rec(5.103, 0.1)]
    assert step_log.loop_overheads_s(records) == pytest.approx([0.002, 0.003])


def test_overlaps_share_of_engine_time():
    mine = [_rec(0.0, 1.0), _rec(2.0, 1.0), _rec(4.0, 1.0)]
    others = [_rec(0.5, 1.0), _rec(2.0, 0.25), _rec(2.5, 0.25)]
    assert step_log.overlaps(mine, others) == pytest.approx([0.5, 0.5, 0.0])


def test_learned_costs_are_the_state_after_the_last_step_before():
    a, b = _learned().state(), StepCosts(0.5).state()
    records = [_rec(1.0, 0.1, costs=a), _rec(2.0, 0.1, costs=b)]
    assert step_log.learned_costs(records, 0.5) is None
    assert step_log.learned_costs(records, 1.5).state() == a
    assert step_log.learned_costs(records, 9.0).state() == b


def _model_s(tokens: int, seqs: int) -> float:
    """The truth the synthetic workers follow: 20 ms + 1 ms a token + 5 ms a sequence, plus
    30 ms when the step carries prompt tokens, plus 8 ms more for a batch of 4 rows."""
    return 0.020 + 0.001 * tokens + 0.005 * seqs + 0.030 * (tokens > seqs) + 0.008 * (tokens == 4)


def _worker_steps(role: str, t0: float, factor: float, shapes) -> list:
    out, t = [], t0
    for tokens, seqs in shapes:
        seconds = _model_s(tokens, seqs) * factor
        out.append(_rec(t, seconds, tokens=tokens, seqs=seqs, role=role))
        t += seconds + 0.001
    return out


def test_fit_live_recovers_the_workers_costs_and_factors():
    shapes = [(n, n) for n in (1, 2, 3, 4, 5, 6)] * 6 + [(32 + 7 * i, 1 + i % 3) for i in range(30)]
    decode_alone = _worker_steps("decode", 0.0, 1.0, shapes)
    prefill_alone = _worker_steps(
        "prefill", 100.0, 1.25, [(64 * (1 + i % 8), 1) for i in range(12)]
    )
    # Then both compute at once: each step 1.1x as long.
    both = 200.0
    decode_busy = _worker_steps("decode", both, 1.1, [(3, 3)] * 40)
    prefill_busy = _worker_steps("prefill", both, 1.25 * 1.1, [(512, 1)] * 6)
    fitted = prof.fit_live({"d": decode_alone + decode_busy, "p": prefill_alone + prefill_busy})
    cost = replace(LINEAR, coefficients=tuple(fitted["coefficients"]),
                   prompt_step_s=fitted["prompt_step_s"],
                   token_residuals_s=tuple((int(n), r) for n, r in
                                           fitted["token_residuals_s"].items()))  # fmt: skip
    for tokens, seqs in ((1, 1), (4, 4), (5, 5), (64, 2), (200, 1)):
        shape = StepShape(tokens, seqs, 0.0, 0)
        assert cost.step_s(shape) == pytest.approx(_model_s(tokens, seqs), rel=0.03), shape
    assert fitted["prompt_step_s"] == pytest.approx(0.030, rel=0.1)
    assert fitted["prefill_worker_factor"] == pytest.approx(1.25, rel=0.02)
    assert fitted["contention_factor"] == pytest.approx(1.1, rel=0.03)
    assert fitted["median_relative_error"] < 0.01
    assert fitted["max_fitted_tokens"] == 32 + 7 * 29  # the decode worker's largest step
    assert prof.extrapolation_warning(fitted, 400) is None
    assert "reach 235 of the 1024-token budget" in prof.extrapolation_warning(fitted, 1024)


def test_calibrated_cost_adds_prompt_step_and_token_residuals():
    cost = replace(LINEAR, prompt_step_s=0.05, token_residuals_s=((4, 0.002),))
    assert cost.step_s(StepShape(4, 4, 4, 4)) == pytest.approx(0.010 + 0.004 + 0.002)
    assert cost.step_s(StepShape(40, 2, 40, 40)) == pytest.approx(0.010 + 0.040 + 0.05)
    steps = cost.step_s(StepShape(np.array([3, 4]), np.array([3, 4]), 0.0, 0.0))
    assert steps == pytest.approx([0.013, 0.016])


def test_profile_with_a_bad_residual_table_names_the_field(tmp_path):
    path = tmp_path / "p.json"
    profile = {"engine": {"num_kv_blocks": 64, "block_size": 16, "max_num_seqs": 8,
                          "max_num_batched_tokens": 64},
               "step_fit": {"coefficients": [0.01, 0.001, 0, 0, 0], "prefill_tokens_per_s": 1e3,
                            "token_residuals_s": {"four": 0.1}}}  # fmt: skip
    path.write_text(json.dumps(profile))
    with pytest.raises(WorkloadError, match="token_residuals_s"):
        load_profile(path)
    profile["step_fit"] |= {"token_residuals_s": {"4": 0.1}, "contention_factor": 1.2,
                            "prefill_worker_factor": 1.1, "prompt_step_s": 0.03}  # fmt: skip
    path.write_text(json.dumps(profile))
    cost = load_profile(path)
    assert (cost.token_residuals_s, cost.contention_factor) == (((4, 0.1),), 1.2)
    assert (cost.prefill_factor, cost.prompt_step_s) == (1.1, 0.03)


def _mixed_workload():
    return synthetic(40, 15.0, seed=3, prompt=Lengths("uniform:8:300"),
                     output=Lengths("uniform:1:30"))  # fmt: skip


@pytest.mark.parametrize("factors", [(1.0, 1.5), (1.3, 1.0), (1.2, 1.4)])
def test_factors_fast_forward_still_equals_stepping(factors):
    prefill_factor, contention = factors
    cost = replace(LINEAR, coefficients=(0.004, 2e-5, 1e-4, 1e-8, 2e-6),
                   prefill_factor=prefill_factor, contention_factor=contention)  # fmt: skip
    w = _mixed_workload()
    fast = simulate(w, SimConfig(1, 1, threshold_tokens=100, **T), cost)
    slow = simulate(w, SimConfig(1, 1, threshold_tokens=100, fast_forward=False, **T), cost)
    for a, b in zip(fast["requests"], slow["requests"], strict=True):
        assert a["ttft_s"] == pytest.approx(b["ttft_s"], abs=1e-9)
        assert a["e2e_s"] == pytest.approx(b["e2e_s"], abs=1e-9)
    assert fast["itl_s"] == pytest.approx(slow["itl_s"], abs=1e-9)


def test_contention_slows_only_overlapping_replicas():
    w = _mixed_workload()
    base = simulate(w, SimConfig(1, 1, threshold_tokens=100, **T), LINEAR)
    slowed = simulate(w, SimConfig(1, 1, threshold_tokens=100, **T),
                      replace(LINEAR, contention_factor=1.5))  # fmt: skip
    assert slowed["ttft_s"]["p50"] > base["ttft_s"]["p50"]
    # One replica alone never contends.
    alone = simulate(w, SimConfig(0, 1, **T), LINEAR)
    assert simulate(w, SimConfig(0, 1, **T), replace(LINEAR, contention_factor=1.5)) == alone


def test_prefill_factor_slows_the_prefill_replica():
    res = simulate([Request(0.0, 200, 3)], SimConfig(1, 1, threshold_tokens=128, **T),
                   replace(LINEAR, prefill_factor=2.0))  # fmt: skip
    end = 0.005 + 2 * (3 * 0.074 + 0.018)  # the 200-token prefill (64+64+64+8), twice as long
    ready = max(end + 0.002 + 20000 / 2 / 1e6, 0.005 + 0.002 + 20000 / 1e6)
    assert res["requests"][0]["ttft_s"] == pytest.approx(ready)


def test_handed_off_first_token_waits_for_the_decode_step_in_flight():
    # Request 0 prefills locally (60 tokens: 5-75 ms), then decodes alone in 11 ms steps.
    # Request 1's 128 tokens are prefilled remotely (64 + 64: 5-153 ms) and its KV lands
    # (at once: a fast link) during the decode step of 152-163 ms: the decode worker admits
    # it, and streams its first token, when that step ends.
    workload = [Request(0.0, 60, 20), Request(0.0, 128, 2)]
    fast_link = replace(LINEAR, link=Link(0.0, 1e15, 100.0, 2))
    for fast_forward in (True, False):
        config = SimConfig(1, 1, threshold_tokens=128, fast_forward=fast_forward, **T)
        local, remote = simulate(workload, config, fast_link)["requests"]
        assert (local["route"], remote["route"]) == ("local", "disaggregated")
        assert remote["ttft_s"] == pytest.approx(0.075 + 8 * 0.011)


def test_simulation_starts_from_the_learned_state():
    learned = _learned()
    sim = Simulator([Request(0.0, 40, 3)], SimConfig(0, 1, **T), LINEAR)
    sim.start_from({"decode-0": StepCosts.from_state(learned.state())})
    assert sim.replicas["decode-0"].report["step_s"] == learned.report()["step_s"]
    with pytest.raises(KeyError):
        sim.start_from({"prefill-0": learned})
