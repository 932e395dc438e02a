"""``python -m services.decode [--flags]``: run one decode worker (settings: services.decode.settings)."""

from __future__ import annotations

import asyncio

from pdserve.kv.malloc import keep_large_buffers
from pdserve.telemetry import setup_from_settings
from services.decode.server import serve
from services.decode.settings import DecodeSettings


def main() -> None:
    keep_large_buffers()  # KV blocks arrive as multi-MiB gRPC messages
    settings = DecodeSettings.from_args()
    telemetry = setup_from_settings(settings, "decode")
    try:
        asyncio.run(serve(settings))
    finally:
        telemetry.shutdown()  # flush the last spans


if __name__ == "__main__":
    main()
