"""``python -m services.prefill [--flags]``: run one prefill worker (settings: services.prefill.settings)."""

from __future__ import annotations

import asyncio

from pdserve.logging import configure_logging
from services.prefill.server import serve
from services.prefill.settings import PrefillSettings


def main() -> None:
    settings = PrefillSettings.from_args()
    configure_logging(settings.log_level, json=settings.log_json)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
