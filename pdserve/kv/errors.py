"""Typed KV store errors. The store raises these; the gRPC edge maps each to one status
(``grpc_code`` names it) and the clients map statuses back, so callers catch the same types
whichever transport they use."""

from __future__ import annotations


class KVError(Exception):
    """Base of every KV store error."""

    grpc_code = "INTERNAL"


class InvalidBlockError(KVError, ValueError):
    """Malformed key, wrong block size, chunk outside the block."""

    grpc_code = "INVALID_ARGUMENT"


class ChunkOrderError(InvalidBlockError):
    """Chunks out of protocol: overlap, seal before all bytes, bytes after the seal."""


class BlockExistsError(KVError):
    """The key is already stored (blocks are immutable; set skip_existing to ignore)."""

    grpc_code = "ALREADY_EXISTS"


class ChecksumMismatchError(KVError):
    """The bytes sent do not match the checksum sent with them."""

    grpc_code = "DATA_LOSS"


class CapacityError(KVError):
    """No room: every staging slot is busy, or every tier is full of pinned blocks."""

    grpc_code = "RESOURCE_EXHAUSTED"


class LeaseNotFoundError(KVError, KeyError):
    """Unknown or already expired lease."""

    grpc_code = "NOT_FOUND"


class StoreClosedError(KVError):
    """The store is shutting down."""

    grpc_code = "UNAVAILABLE"


BY_GRPC_CODE: dict[str, type[KVError]] = {
    "INVALID_ARGUMENT": InvalidBlockError,
    "ALREADY_EXISTS": BlockExistsError,
    "DATA_LOSS": ChecksumMismatchError,
    "RESOURCE_EXHAUSTED": CapacityError,
    "NOT_FOUND": LeaseNotFoundError,
    "UNAVAILABLE": StoreClosedError,
}
