"""Chained block keys for prefix caching and the KV handoff.

key_0 = H(domain ‖ model fingerprint ‖ cache_salt); key_i = H(key_{i-1} ‖ token ids of block i),
H = BLAKE2b with a 16-byte digest. Equal prefixes give equal keys on every node, so routing and
reuse need no coordination; different salts (tenants) never share a key.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import NewType

BlockKey = NewType("BlockKey", bytes)

BLOCK_KEY_BYTES = 16
_DOMAIN = b"pdserve.block.v1"


def root_key(model_fingerprint: str, cache_salt: str | None = None) -> BlockKey:
    """The chain seed: unique per model and per salt."""
    h = hashlib.blake2b(digest_size=BLOCK_KEY_BYTES)
    h.update(_DOMAIN)
    h.update(model_fingerprint.encode())
    if cache_salt is not None:
        # Length-prefixed so ("ab", salt "c") can never collide with ("a", salt "bc").
        salt = cache_salt.encode()
        h.update(len(salt).to_bytes(4, "little"))
        h.update(salt)
    return BlockKey(h.digest())


def next_block_key(parent: BlockKey, block_token_ids: Sequence[int]) -> BlockKey:
    h = hashlib.blake2b(parent, digest_size=BLOCK_KEY_BYTES)
    h.update(array("I", block_token_ids).tobytes())
    return BlockKey(h.digest())


def chain_block_keys(
    token_ids: Sequence[int], block_size: int, root: BlockKey, start_parent: BlockKey | None = None
) -> list[BlockKey]:
    """Keys of every *full* block of `token_ids` (a trailing partial block has no key)."""
    keys: list[BlockKey] = []
    parent = start_parent if start_parent is not None else root
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = next_block_key(parent, token_ids[start : start + block_size])
        keys.append(parent)
    return keys
