"""Telemetry fixtures: each test gets a fresh set-up writing to its own directory.

The in-process kvstore, prefill and decode servers of tests/serving/conftest.py and the OTLP
receiver of test_telemetry.py are shared with test_services_tracing.py from here.
"""

from __future__ import annotations

import logging

import pytest
import structlog

from pdserve import telemetry as tel
from tests.observability.test_telemetry import otlp_receiver  # noqa: F401 - fixture
from tests.serving.conftest import (  # noqa: F401 - fixtures
    checkpoint,
    make_decode,
    make_kvstore,
    make_prefill,
    serving_cluster,
)


@pytest.fixture
def setup(tmp_path):
    """``setup(role, **kwargs)`` -> Telemetry; everything is torn down after the test."""
    made: list[tel.Telemetry] = []

    def make(role: str = "router", **kwargs) -> tel.Telemetry:
        kwargs.setdefault("trace_dir", tmp_path / "traces")
        kwargs.setdefault("otlp_endpoint", "")
        kwargs.setdefault("log_level", None)
        t = tel.setup_telemetry(role, **kwargs)
        made.append(t)
        return t

    yield make
    for t in made:
        t.shutdown()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, tel._HANDLER_MARK, False)]:
        root.removeHandler(handler)
    structlog.reset_defaults()
