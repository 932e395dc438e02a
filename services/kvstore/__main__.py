"""``python -m services.kvstore [--flags]``: run one kvstore node (settings: pdserve.config)."""

from __future__ import annotations

from pdserve.config import KVStoreSettings
from pdserve.logging import configure_logging
from services.kvstore.server import serve


def main() -> None:
    settings = KVStoreSettings.from_args()
    configure_logging(settings.log_level, json=settings.log_json)
    serve(settings)


if __name__ == "__main__":
    main()
