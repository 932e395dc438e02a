"""The router's cost policy on its real core (in-memory workers): what the workers report
in their heartbeat decides where a long prompt is prefilled, and the predictions ride on the
route explanation and the ``router.route`` span."""

from __future__ import annotations

import dataclasses

import pytest

from services.router.router import Router
from services.router.settings import RouterSettings
from tests.serving.router_fakes import FakeClients, FakeDirectory, model_info
from tests.serving.test_router_core import LONG, run

BUSY_DECODE = {"running": 8, "waiting": 0, "step_s": 0.04, "prompt_tokens_per_s": 1000.0}


def make_router(decode_load: dict, prefill_load: dict) -> tuple[Router, FakeClients]:
    directory = FakeDirectory(("p0",), ("d0",))
    loads = {"d0": decode_load, "p0": prefill_load}
    directory.infos = [dataclasses.replace(w, load=loads[w.worker_id]) for w in directory.infos]
    settings = RouterSettings(
        disagg_threshold_tokens=128, prefill_tokens_per_s=1000.0, handoff_s=0.08,
        tpot_slo_s=0.1, http_port=0,
    )  # fmt: skip
    clients = FakeClients(("p0",), ("d0",))
    return Router(settings, model_info(), directory, clients), clients


def test_an_idle_decode_worker_prefills_a_long_prompt_itself():
    router, clients = make_router({}, {})
    route = run(router, prompt=LONG)[0].route
    assert not route.disaggregated and clients.prefill_workers["p0"].calls == []
    # one 50 ms step (the router's prior) that computes 300 tokens at 1,000/s
    assert route.predicted_local_ttft_s == pytest.approx(0.35)
    assert route.predicted_remote_ttft_s == pytest.approx(0.38)  # 300 tokens + an 80 ms handoff
    assert route.reason.startswith("local is faster")


def test_a_busy_decode_worker_sends_a_long_prompt_to_the_prefill_worker():
    router, clients = make_router(BUSY_DECODE, {})
    route = run(router, prompt=LONG)[0].route
    assert route.disaggregated and route.prefill_worker == "p0"
    # 300 tokens in chunks of 60 next to 40 ms decode steps: 0.3 s + 5 steps
    assert route.predicted_local_ttft_s == pytest.approx(0.3 + 5 * 0.04)
    assert route.predicted_remote_ttft_s == pytest.approx(0.38)
    assert route.reason.startswith("remote is faster")


def test_a_queued_prefill_worker_loses_to_the_busy_decode_worker():
    router, clients = make_router(BUSY_DECODE, {"running": 1, "pending_prompt_tokens": 3000})
    route = run(router, prompt=LONG)[0].route
    assert not route.disaggregated and clients.prefill_workers["p0"].calls == []
    assert route.predicted_remote_ttft_s == pytest.approx(3.38)
    assert "prefill queue 3000 tokens" in route.reason


def test_the_threshold_policy_ignores_the_reports():
    router, _ = make_router({}, {"pending_prompt_tokens": 3000})
    router.settings = router.settings.model_copy(update={"disaggregation_policy": "threshold"})
    route = run(router, prompt=LONG)[0].route
    assert route.disaggregated and route.predicted_remote_ttft_s == 0.0


def test_the_route_span_carries_both_predictions():
    from services.router import observe, policy

    decode = policy.WorkerLoad("d0", 8, 64, num_running=8, step_s=0.04, prompt_tokens_per_s=1e3)
    costs = policy.CostModel(prefill_tokens_per_s=1e3, handoff_s=0.05, tpot_slo_s=0.1)
    plan = policy.plan_route([decode], [policy.WorkerLoad("p0", 0, 64)], 300,
                             policy.Weights(), 128, costs=costs)  # fmt: skip
    attrs = observe.route_attributes(plan, {}, plan.disaggregation.reason_class, 1)
    assert attrs["pdserve.route.predicted_local_ttft_s"] == pytest.approx(0.5)
    assert attrs["pdserve.route.predicted_remote_ttft_s"] == pytest.approx(0.35)
    assert attrs["pdserve.route.reason_class"] == "remote_faster"


def test_the_decode_workers_load_carries_its_shortest_running_output():
    """The TPOT check spreads a local prefill over the running streams' outputs; the router
    knows them from the Decode calls it has open."""
    from services.router import admission

    router, _ = make_router(BUSY_DECODE, {})
    [decode] = router.directory.workers("decode")
    assert router._loads([decode], {})[0].min_output_tokens == 0
    router._decode_inflight["d0"]["a"] = admission.Inflight(20, 4, 64)
    router._decode_inflight["d0"]["b"] = admission.Inflight(5, 4, 32)
    assert router._loads([decode], {})[0].min_output_tokens == 32
