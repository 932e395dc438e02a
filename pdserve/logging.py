"""structlog set-up: kept for existing callers; the implementation is pdserve/telemetry.py.

Services should call ``pdserve.telemetry.setup_from_settings`` instead, which configures
logging and tracing together and adds the service name to every line.
"""

from __future__ import annotations

from pdserve.telemetry import configure_logging

__all__ = ["configure_logging"]
