"""``python -m services.router [--flags]``: the front door (settings: services/router/settings.py)."""

from __future__ import annotations

from pdserve.telemetry import setup_from_settings
from services.router.console_data import RecentSpans
from services.router.server import serve
from services.router.settings import RouterSettings


def main() -> None:
    settings = RouterSettings.from_args()
    telemetry = setup_from_settings(settings, "router")
    spans = RecentSpans(settings.console_max_traces)  # the console's view of recent requests
    telemetry.provider.add_span_processor(spans)
    try:
        serve(settings, spans)
    finally:
        telemetry.shutdown()  # flush the last spans


if __name__ == "__main__":
    main()
