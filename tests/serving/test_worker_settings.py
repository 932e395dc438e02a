"""WorkerSettings contains the engine's EngineConfig (``settings.engine``) and keeps the flat
names operators use: ``PDSERVE_<ROLE>_<FIELD>`` variables, ``--kebab-case`` flags and keyword
arguments, in that order of precedence (lowest first), over a role's engine defaults."""

from __future__ import annotations

import pydantic
import pytest

from pdserve.engine.engine_config import EngineConfig
from services.decode.settings import DecodeSettings
from services.prefill.settings import PrefillSettings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith(("PDSERVE_PREFILL_", "PDSERVE_DECODE_")):
            monkeypatch.delenv(name)


def test_defaults_are_the_engines_and_the_decode_roles_slo():
    assert PrefillSettings().engine == EngineConfig()
    assert DecodeSettings().engine == EngineConfig(target_step_s=0.1, prompt_drain_s=0.5)


def test_variables_flags_and_keywords_set_engine_fields_by_their_flat_names(monkeypatch):
    monkeypatch.setenv("PDSERVE_DECODE_MODEL", "/models/x.gguf")
    monkeypatch.setenv("PDSERVE_DECODE_KV_CACHE_BYTES", "4096")
    monkeypatch.setenv("PDSERVE_DECODE_NUM_THREADS", "3")
    monkeypatch.setenv("PDSERVE_PREFILL_BLOCK_SIZE", "32")  # another role's: not read
    s = DecodeSettings.from_args(
        ["--kv-cache-bytes", "8192", "--quantization", "none", "--grpc-port", "7"],
        target_step_s=0.25,
    )
    assert s.engine == EngineConfig(
        model="/models/x.gguf", kv_cache_bytes=8192, num_threads=3, quantization="none",
        target_step_s=0.25, prompt_drain_s=0.5,
    )  # fmt: skip
    assert s.grpc_port == 7 and s.engine_config() is s.engine
    assert PrefillSettings().engine.block_size == 32


def test_an_engine_config_can_be_passed_whole_and_flat_fields_still_win():
    s = PrefillSettings(engine=EngineConfig(block_size=8, max_num_seqs=2), max_num_seqs=4)
    assert (s.engine.block_size, s.engine.max_num_seqs) == (8, 4)


def test_engine_fields_are_validated_by_engine_config():
    with pytest.raises(pydantic.ValidationError, match="dtype must be one of"):
        DecodeSettings(dtype="int3")
    with pytest.raises(pydantic.ValidationError, match="block_size must be in"):
        PrefillSettings.from_args(["--block-size", "0"])
