"""``python -m services.prefill [--flags]``: run one prefill worker (settings: services.prefill.settings)."""

from __future__ import annotations

import asyncio

from pdserve.kv.malloc import keep_large_buffers
from pdserve.telemetry import setup_from_settings
from services.prefill.server import serve
from services.prefill.settings import PrefillSettings


def main() -> None:
    keep_large_buffers()  # KV blocks arrive as multi-MiB gRPC messages
    settings = PrefillSettings.from_args()
    telemetry = setup_from_settings(settings, "prefill")
    try:
        asyncio.run(serve(settings))
    finally:
        telemetry.shutdown()  # flush the last spans


if __name__ == "__main__":
    main()
