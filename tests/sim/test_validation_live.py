"""The live-vs-simulated validation, small: keeps benchmarks/sim_validate.py from rotting.

A few engine shapes are profiled in this process, a colocated stack is started (one decode
worker, one thread), its dispatch latency is measured, six requests are replayed live with
``pdserve bench``'s replay and simulated with the resulting calibrated profile. The full
benchmark holds the 15 % target; on a shared CI core this small run only checks that the
pipeline holds together: same result shape, every request served in both, TTFT p50 within 3x.
"""

from __future__ import annotations

import asyncio

import pytest

from pdserve.launcher import Stack, StackConfig
from pdserve.sim import profile as prof
from pdserve.sim.cluster import SimConfig, Simulator
from pdserve.sim.costs import CalibratedCost, EngineLimits
from pdserve.workload import result
from pdserve.workload.bench import replay, target_for
from pdserve.workload.generate import Lengths, synthetic

pytestmark = pytest.mark.slow

CASES = [(32, 1, 1), (192, 1, 1), (48, 8, 1), (48, 8, 4)]


def test_live_bench_and_calibrated_sim_agree_roughly():
    workload = synthetic(6, 0.5, Lengths("uniform:32:192"), Lengths("fixed:8"), seed=7)
    env = {"PDSERVE_DECODE_NUM_THREADS": "1", "PDSERVE_LOG_LEVEL": "warning",
           "PDSERVE_DECODE_QUANTIZATION": "none", "PDSERVE_PREFILL_QUANTIZATION": "none"}  # fmt: skip
    config = StackConfig(num_prefill=0, num_decode=1, default_ports=False, env=env,
                         cluster_name="simtest")  # fmt: skip
    with Stack(config) as stack:
        # Profiled while the stack idles next to it: the same contention as the live run.
        rows, engine = prof.measure_engine(
            1, 1 << 30, 1, lambda _line: None, cases=CASES, quantization="none"
        )
        coefficients, _error = prof.fit(rows)
        dispatch = prof.measure_dispatch(stack.grpc_address, coefficients, engine, 128, print)

        async def go():
            target = target_for(stack.grpc_address, 300)
            try:
                return await replay(workload, target)
            finally:
                await target.close()

        records, gaps, weights = asyncio.run(go())
    live = result.build(records, gaps, weights, result.Slo(), "bench", {})
    limits = EngineLimits(engine["num_kv_blocks"], engine["block_size"], engine["max_num_seqs"],
                          engine["max_num_batched_tokens"])  # fmt: skip
    cost = CalibratedCost("test", tuple(coefficients), limits, None, dispatch["latency_s"],
                          prof.prefill_tokens_per_s(coefficients, engine))  # fmt: skip
    sim = Simulator(workload, SimConfig(0, 1), cost)
    sim.run()
    simulated = sim.result()
    assert set(live) == set(simulated)
    assert set(live["requests"][0]) == set(simulated["requests"][0])
    assert live["num_failed"] == simulated["num_failed"] == 0
    assert [r["num_output_tokens"] for r in live["requests"]] == [8] * 6
    ratio = simulated["ttft_s"]["p50"] / live["ttft_s"]["p50"]
    assert 1 / 3 < ratio < 3, (live["ttft_s"], simulated["ttft_s"])
