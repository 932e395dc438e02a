"""The step-cost model (pdserve/engine/step_costs.py) and the scheduler's prompt budget."""

from __future__ import annotations

import pytest

from pdserve.engine.block_hash import root_key
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import Sequence
from pdserve.engine.step_costs import StepCosts


def test_costs_separate_the_decode_base_from_the_per_prompt_token_cost():
    costs = StepCosts()
    costs.record(num_prompt_tokens=0, num_decode_tokens=4, elapsed_s=0.040)
    costs.record(num_prompt_tokens=200, num_decode_tokens=4, elapsed_s=0.240)
    assert costs.base_step_s == pytest.approx(0.040)
    assert costs.prompt_token_s == pytest.approx(0.001)
    assert costs.prompt_tokens_per_s == pytest.approx(1000)
    assert costs.report() == {"step_s": 0.04, "prompt_step_s": 0.0, "prompt_tokens_per_s": 1000.0}


def test_costs_separate_a_prompt_step_s_fixed_cost_from_its_per_token_cost():
    """A CPU with 4-bit weights pays ~90 ms for any step carrying prompt tokens (the dense
    weights are read) and ~1.5 ms per token: averaging per token priced a 256-token prompt from
    the 32-token chunks at (90 + 48) / 32 ms a token, 4 times too high."""
    costs = StepCosts()
    costs.record(0, 4, 0.050)
    for num_prompt in (32, 32, 64, 32, 128, 32, 256, 32):
        costs.record(num_prompt, 4, 0.050 + 0.090 + 0.0015 * num_prompt)
    assert costs.prompt_step_s == pytest.approx(0.090)
    assert costs.prompt_token_s == pytest.approx(0.0015)
    assert costs.report()["prompt_step_s"] == pytest.approx(0.09)
    # The step target cannot hold any prompt chunk; draining 256 tokens in 0.6 s needs one.
    assert costs.prompt_budget(0.1, 32, 512) == 32
    assert costs.prompt_budget(0.1, 32, 512, pending_prompt_tokens=256, drain_s=0.6) == 166


def test_costs_follow_a_slower_machine_within_a_few_steps():
    costs = StepCosts()
    for _ in range(3):
        costs.record(0, 8, 0.040)
    for _ in range(15):
        costs.record(0, 8, 0.080)
    assert 0.075 < costs.base_step_s < 0.080


def test_a_prefill_alone_is_all_prompt_cost_and_tiny_prompts_are_ignored():
    costs = StepCosts()
    costs.record(num_prompt_tokens=8, num_decode_tokens=0, elapsed_s=0.5)
    assert costs.prompt_token_s == 0
    costs.record(num_prompt_tokens=100, num_decode_tokens=0, elapsed_s=0.2)
    assert costs.prompt_token_s == pytest.approx(0.002)


def test_prompt_budget_fits_the_step_target_within_floor_and_cap():
    costs = StepCosts()
    assert costs.prompt_budget(0.1, floor_tokens=16, cap_tokens=512) == 512  # unknown yet
    costs.record(0, 4, 0.040)
    costs.record(200, 4, 0.240)
    assert costs.prompt_budget(0.1, floor_tokens=16, cap_tokens=512) == 60
    assert costs.prompt_budget(0.03, floor_tokens=16, cap_tokens=512) == 16
    assert costs.prompt_budget(10.0, floor_tokens=16, cap_tokens=512) == 512


def _seq(rid: str, num_prompt: int, index: int) -> Sequence:
    first = 100 * (index + 1)  # no shared prefix between the tests' sequences
    return Sequence(rid, list(range(first, first + num_prompt)), 8, root_key("m", None), index)


def _decoding(sched: Scheduler, seq: Sequence) -> None:
    sched.add(seq)
    plan = sched.schedule()
    sched.update(plan, {seq.request_id: 7})


def test_prompt_budget_limits_prompt_tokens_next_to_running_decodes():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64)
    _decoding(sched, _seq("a", 4, 0))
    sched.add(_seq("b", 40, 1))
    plan = sched.schedule(prompt_budget=10)
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in plan.chunks] == [
        ("a", 4, 1),
        ("b", 0, 10),
    ]
    assert plan.num_prompt_tokens == 10
    sched.update(plan, {"a": 7})
    plan = sched.schedule(prompt_budget=10)  # the unfinished prefill continues, still capped
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in plan.chunks] == [
        ("a", 5, 1),
        ("b", 10, 10),
    ]


def test_prompt_budget_does_not_apply_without_decodes():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(_seq("b", 40, 0))
    plan = sched.schedule(prompt_budget=10)
    assert [(c.seq.request_id, c.num_tokens) for c in plan.chunks] == [("b", 40)]


def test_prompt_budget_grows_to_drain_queued_prompts_in_time():
    costs = StepCosts()
    costs.record(0, 4, 0.040)
    costs.record(200, 4, 0.240)  # 40 ms base, 1 ms per prompt token
    # 600 queued tokens within 1 s: 0.6 s of compute leaves 0.4 s for 600 * 0.04 / P of bases
    assert costs.prompt_budget(0.1, 16, 512, pending_prompt_tokens=600, drain_s=1.0) == 60
    assert costs.prompt_budget(0.1, 16, 512, pending_prompt_tokens=600, drain_s=0.7) == 240
    assert costs.prompt_budget(0.1, 16, 512, pending_prompt_tokens=900, drain_s=0.7) == 512
    assert costs.prompt_budget(0.1, 16, 512, pending_prompt_tokens=20, drain_s=1.0) == 60


def test_step_budget_is_none_without_a_target_and_floored_with_one():
    costs = StepCosts()
    costs.record(0, 4, 0.040)
    costs.record(200, 4, 0.240)
    assert costs.step_budget(None, 0.5, 512, 600) is None
    assert costs.step_budget(0.03, None, 512, 0) == 32  # MIN_PROMPT_CHUNK_TOKENS
    assert costs.step_budget(0.03, None, 16, 0) == 16  # never above the token budget
