"""benchmarks/goodput.py's sweep: each rate's run must meet prompts no server has cached yet."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import goodput  # noqa: E402


def _seed_of(cmd: list[str]) -> str:
    return cmd[cmd.index("--seed") + 1]


def test_each_rate_of_the_sweep_draws_its_own_prompts(tmp_path, monkeypatch):
    monkeypatch.setattr(goodput, "OUT", tmp_path)
    monkeypatch.setattr(goodput, "LOGS", tmp_path)
    commands = []

    def fake_run(cmd, **_):
        commands.append(cmd)
        name = cmd[cmd.index("--result-filename") + 1]
        (tmp_path / name).write_text(json.dumps({"completed": 1}))
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(goodput.subprocess, "run", fake_run)
    args = SimpleNamespace(input_len=256, output_len=32, num_prompts=4, slo_ttft_ms=1000,
                           slo_tpot_ms=150)  # fmt: skip
    for rate in (1.0, 2.0, 3.0):
        goodput.run_client("http://127.0.0.1:1", tmp_path, rate, "pdserve", args)
        goodput.run_client("http://127.0.0.1:2", tmp_path, rate, "vllm", args)
    seeds = [_seed_of(cmd) for cmd in commands]
    assert len(set(seeds[0::2])) == 3, "a later rate replays an earlier rate's prompts"
    assert seeds[0::2] == seeds[1::2], "both targets must see the same prompts at one rate"
