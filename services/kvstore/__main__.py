"""``python -m services.kvstore [--flags]``: run one kvstore node (settings: pdserve.config)."""

from __future__ import annotations

import os

from pdserve.config import KVStoreSettings
from pdserve.kv.malloc import keep_large_buffers
from pdserve.telemetry import setup_from_settings
from services.kvstore.server import serve


def main() -> None:
    keep_large_buffers()  # KV blocks arrive as multi-MiB gRPC messages
    settings = KVStoreSettings.from_args()
    worker_id = f"kvstore-{settings.node_id}-{os.getpid()}-{settings.grpc_port}"  # as registered
    telemetry = setup_from_settings(settings, "kvstore", worker_id=worker_id)
    try:
        serve(settings)
    finally:
        telemetry.shutdown()  # flush the last spans


if __name__ == "__main__":
    main()
