"""benchmarks/sim_validate.py, small: keeps the live-vs-simulated validation from rotting.

The script itself runs, colocated only: a quick profile calibrated on a stack of its own from
the decode worker's step log (``pdserve profile --quick --step-log``: calibration traffic
through that stack, then the fit of the steps the worker logged; dispatch through the stack),
then, on the stack ``pdserve up`` runs, four requests
live with ``pdserve bench``'s replay at each of two light loads it derives from the profile,
each simulated with that profile from the state the stack had learned when the run started.
The full benchmark holds the 15 % target; on a shared CI machine this small run only checks
that the pipeline holds together: the profile fitted from the worker's logged steps, the
learned state and the run's steps captured, the table and every file written, the same result
shape live and simulated, every request served in both, TTFT p50 within 3x.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import sim_validate  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pins workers to CPUs 0 and 1"),
]


def test_sim_validate_quick_runs_and_agrees_roughly(tmp_path, capsys):
    # Light loads: little queueing, so a neighbour's burst on the shared cores moves TTFT less.
    rows = sim_validate.main(["--quick", "--modes", "colocated", "--num-requests", "4",
                              "--calibration-requests", "4", "--loads", "0.1,0.3",
                              "--out", str(tmp_path)])  # fmt: skip
    assert [r["mode"] for r in rows] == ["colocated", "colocated"]
    assert rows[0]["rate"] < rows[1]["rate"]  # the two loads, in requests/s
    assert "sim validation [4 requests per run" in capsys.readouterr().out
    assert (tmp_path / "TABLE.md").exists() and (tmp_path / "profile.json").exists()
    fit = json.loads((tmp_path / "profile.json").read_text())["step_fit"]
    assert fit["source"] == "worker step logs" and fit["num_steps"] > 20, fit
    assert fit["contention_factor"] == 1.0  # one worker: nothing to contend with
    assert fit["max_fitted_tokens"] > 64  # the calibration stack's decode worker is not capped
    assert (tmp_path / "steps" / "calibration-decode.jsonl").stat().st_size > 0
    for r in rows:
        live = json.loads((tmp_path / f"bench-colocated-{r['rate']}.json").read_text())
        sim = json.loads((tmp_path / f"sim-colocated-{r['rate']}.json").read_text())
        assert set(live) == set(sim) and set(live["requests"][0]) == set(sim["requests"][0])
        assert live["num_failed"] == sim["num_failed"] == 0
        assert live["num_requests"] == sim["num_requests"] == 4
        assert 1 / 3 < r["ttft_p50"]["sim"] / r["ttft_p50"]["live"] < 3, r
        learned = live["conditions"]["learned"]
        assert len(learned["step_costs"]["decode-0"]) == 8 and learned["prefill_tokens_per_s"] > 0
        assert r["steps"]["decode-0"]["num_steps"] > 4  # the run's own steps, from the log
