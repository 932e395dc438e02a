"""The ports a service bound, told to the process that started it.

A launcher that picks a free port and hands it to a child races with every other process on
the host: between the pick and the child's bind (seconds: imports, model load) the port can
be taken, by another listener or by any outgoing connection's ephemeral port. So the
launcher lets each child bind its own free ports (gRPC port 0, HTTP port ``FREE_PORT``) and
names a file (``port_file`` in the child's settings); the child writes
``{"grpc_port": ..., "http_port": ...}`` there once every listener is bound (``http_port``
null when disabled), with one rename, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# An HTTP port setting that asks for a free port (0 disables the listener, as it always did).
FREE_PORT = -1


def listen_port(http_port: int) -> int:
    """The port to bind for an enabled HTTP port setting (``FREE_PORT``: 0, any free one)."""
    return 0 if http_port == FREE_PORT else http_port


def write(path: Path | None, *, grpc_port: int, http_port: int | None) -> None:
    """Report the bound ports at ``path`` (nothing when None)."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"grpc_port": grpc_port, "http_port": http_port}))
    os.replace(tmp, path)


def read(path: Path) -> dict[str, int | None] | None:
    """The ports reported at ``path``; None while the child has not written them."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
