"""benchmarks/serving.py: each target's stack (workers, cores, settings) and its summary row."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import serving  # noqa: E402

CPUS = sorted(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="the split needs two CPUs")


@needs_two_cpus
def test_disaggregated_targets_split_the_cores_and_differ_only_in_their_settings(tmp_path):
    half = len(CPUS) // 2
    targets = [*serving.TARGETS, "disaggregated-chunk512"]
    configs = {t: serving.stack_config(t, CPUS, {}, tmp_path) for t in targets}
    for target in ("disaggregated", "disaggregated-strict", "disaggregated-chunk512"):
        config = configs[target]
        assert config.num_prefill == 1
        assert config.cpu_affinity == {"prefill": set(CPUS[:half]), "decode": set(CPUS[half:])}
        assert config.env["PDSERVE_PREFILL_NUM_THREADS"] == str(half)
        assert config.env["PDSERVE_DECODE_STEP_LOG_PATH"] == str(
            (tmp_path / f"steps-{target}-decode.jsonl").resolve()
        )
    strict = configs["disaggregated-strict"].env
    assert strict["PDSERVE_ROUTER_DISAGGREGATION_POLICY"] == "threshold"
    assert strict["PDSERVE_ROUTER_DISAGG_THRESHOLD_TOKENS"] == "0"
    assert configs["disaggregated-chunk512"].env["PDSERVE_DECODE_MAX_NUM_BATCHED_TOKENS"] == "512"
    assert not any("ROUTER" in k or "BATCHED" in k for k in configs["disaggregated"].env)


@pytest.mark.parametrize(
    "name", ["disaggregated-chunk", "disaggregated-chunk0", "chunk64", "split"]
)
def test_an_unknown_target_is_refused_with_the_known_names(name):
    with pytest.raises(ValueError, match="known: disaggregated, .*disaggregated-chunkN"):
        serving.target_settings(name)


def test_colocated_runs_one_decode_worker_on_every_core_with_the_settings_given():
    settings = {"PDSERVE_DECODE_PROMPT_DRAIN_S": "2.0"}
    config = serving.stack_config("colocated", CPUS, settings, None)
    assert config.num_prefill == 0
    assert config.cpu_affinity == {"decode": set(CPUS)}
    assert config.env["PDSERVE_DECODE_NUM_THREADS"] == str(len(CPUS))
    assert config.env["PDSERVE_DECODE_PROMPT_DRAIN_S"] == "2.0"
    assert not any(k.endswith("_STEP_LOG_PATH") for k in config.env)


def test_a_setting_must_name_a_pdserve_variable():
    assert serving._setting("PDSERVE_ROUTER_TPOT_SLO_S=0.1") == ("PDSERVE_ROUTER_TPOT_SLO_S", "0.1")
    with pytest.raises(SystemExit, match="PDSERVE_VAR=VALUE"):
        serving._setting("ROUTER_TPOT_SLO_S=0.1")
    with pytest.raises(SystemExit, match="PDSERVE_VAR=VALUE"):
        serving._setting("PDSERVE_ROUTER_TPOT_SLO_S")


def test_the_row_counts_routes_and_requests_that_met_the_slo():
    quantiles = {"p50": 0.1, "p90": 0.2, "p99": None}
    result = {
        "num_requests": 4, "num_failed": 1, "duration_s": 2.0, "output_tokens_per_s": 10.0,
        "goodput_rps": 1.5, "slo_attainment": 0.75,
        "ttft_s": quantiles, "itl_s": quantiles, "e2e_s": quantiles,
        "requests": [{"route": "local"}, {"route": "disaggregated"}, {"route": "local"},
                     {"route": ""}],
    }  # fmt: skip
    row = serving.row("disaggregated", result)
    assert row["met_slo"] == 3
    assert row["routes"] == {"local": 2, "disaggregated": 1, "unknown": 1}
    assert (row["ttft_p50_ms"], row["ttft_p90_ms"], row["ttft_p99_ms"]) == (100.0, 200.0, None)
