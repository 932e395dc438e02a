"""``python -m services.router [--flags]``: the front door (settings: services/router/settings.py)."""

from __future__ import annotations

from pdserve.telemetry import setup_from_settings
from services.router.server import serve
from services.router.settings import RouterSettings


def main() -> None:
    settings = RouterSettings.from_args()
    telemetry = setup_from_settings(settings, "router")
    try:
        serve(settings)
    finally:
        telemetry.shutdown()  # flush the last spans


if __name__ == "__main__":
    main()
