"""``python -m services.decode [--flags]``: run one decode worker (settings: services.decode.settings)."""

from __future__ import annotations

import asyncio

from pdserve.logging import configure_logging
from services.decode.server import serve
from services.decode.settings import DecodeSettings


def main() -> None:
    settings = DecodeSettings.from_args()
    configure_logging(settings.log_level, json=settings.log_json)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
