"""``python -m services.router [--flags]``: the front door (settings: services/router/settings.py)."""

from __future__ import annotations

from pdserve.logging import configure_logging
from services.router.server import serve
from services.router.settings import RouterSettings


def main() -> None:
    settings = RouterSettings.from_args()
    configure_logging(settings.log_level, json=settings.log_json)
    serve(settings)


if __name__ == "__main__":
    main()
