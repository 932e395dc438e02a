"""What ``pdserve up`` decides for each engine worker's environment (no process started)."""

from __future__ import annotations

import pytest

from pdserve.launcher import SEPARATE_CORES_LAYER_GROUPS, Stack, StackConfig
from services.decode.settings import DISAGGREGATED_MAX_NUM_BATCHED_TOKENS

CAP = "PDSERVE_DECODE_MAX_NUM_BATCHED_TOKENS"


def _engine_env(tmp_path, name: str, role: str, env=None, **config) -> dict[str, str]:
    stack = Stack(StackConfig(log_dir=tmp_path, env=env or {}, **config))
    stack._lay_out_engines()
    stack.kvstore_address = "127.0.0.1:1"
    return stack._engine_env(name, role, stack._service_env(role, 1, 2))


def test_a_decode_worker_beside_prefill_workers_gets_short_steps(tmp_path, monkeypatch):
    monkeypatch.delenv(CAP, raising=False)
    env = _engine_env(tmp_path, "decode-0", "decode", num_prefill=1)
    assert env[CAP] == str(DISAGGREGATED_MAX_NUM_BATCHED_TOKENS) == "64"
    assert "PDSERVE_DECODE_NUM_THREADS" in env


def test_a_colocated_decode_worker_keeps_the_engine_budget(tmp_path, monkeypatch):
    monkeypatch.delenv(CAP, raising=False)
    assert CAP not in _engine_env(tmp_path, "decode-0", "decode", num_prefill=0)


@pytest.mark.parametrize("where", ["environment", "stack env"])
def test_the_operators_budget_wins(tmp_path, monkeypatch, where):
    if where == "environment":
        monkeypatch.setenv(CAP, "512")
        env = _engine_env(tmp_path, "decode-0", "decode", num_prefill=1)
    else:
        monkeypatch.delenv(CAP, raising=False)
        env = _engine_env(tmp_path, "decode-0", "decode", {CAP: "512"}, num_prefill=1)
    assert CAP not in env  # the child inherits the operator's 512


def test_a_prefill_worker_is_pointed_at_the_kvstore(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_PREFILL_KVSTORE_ADDRESS", "elsewhere:1")
    env = _engine_env(tmp_path, "prefill-0", "prefill", num_prefill=1)
    assert env["PDSERVE_PREFILL_KVSTORE_ADDRESS"] == "127.0.0.1:1"  # the stack's own kvstore
    assert CAP.replace("DECODE", "PREFILL") not in env


GROUPS = "PDSERVE_PREFILL_HANDOFF_LAYER_GROUPS"


def test_a_prefill_worker_on_its_own_cores_pipelines_layer_groups(tmp_path, monkeypatch):
    monkeypatch.delenv(GROUPS, raising=False)
    split = {"prefill": {0}, "decode": {1}}
    env = _engine_env(tmp_path, "prefill-0", "prefill", num_prefill=1, cpu_affinity=split)
    assert env[GROUPS] == str(SEPARATE_CORES_LAYER_GROUPS) == "4"
    shared = {"prefill": {0}, "decode": {0}}
    env = _engine_env(tmp_path, "prefill-0", "prefill", num_prefill=1, cpu_affinity=shared)
    assert GROUPS not in env  # an earlier copy would take the core from the compute
    monkeypatch.setenv(GROUPS, "0")
    env = _engine_env(tmp_path, "prefill-0", "prefill", num_prefill=1, cpu_affinity=split)
    assert GROUPS not in env  # the operator's choice wins
