"""Pre-encoded KVStore stream frames: block bytes go from a buffer (the caller's, or the
store's slab) to the wire with one copy, and are read back as views into the received
message, instead of a copy into a protobuf message, another at serialization, a third at
parsing and a fourth when the received pieces are joined.

Only the bulk messages are hand-framed, on both ends of the Put and Get streams, and they
are exactly the protobuf wire encoding of ``PutRequest{chunk: BlockChunk{key, offset, data}}``
and of ``GetResponse{chunk: ...}``; every other message (header, seal, end) goes through
protobuf. tests/kvstore/test_frames.py checks each against protobuf.
"""

from __future__ import annotations

import numpy as np
import xxhash

from pdserve._proto.pdserve.v1 import kvstore_pb2
from pdserve.kv.memcopy import copy_hashed, copy_into, fresh_bytes

_VARINT = 0  # wire type of the offset field; the others are length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


_SMALL_BYTES = 64 << 10  # below this a plain join is cheaper than setting up the copy


def _chunk_frame(
    outer_tag: bytes, key: bytes, offset: int, data: memoryview, hasher: xxhash.xxh3_64 | None
) -> bytes:
    inner_head = b"\x0a" + _varint(len(key)) + key
    if offset:
        inner_head += b"\x10" + _varint(offset)
    if len(data):  # protobuf omits an empty bytes field
        inner_head += b"\x1a" + _varint(len(data))
    head = outer_tag + _varint(len(inner_head) + len(data)) + inner_head
    if len(data) < _SMALL_BYTES:
        if hasher is not None:
            hasher.update(data)
        return b"".join((head, data))
    frame, target = fresh_bytes(len(head) + len(data))
    target[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    if hasher is None:
        copy_into(target[len(head) :], data)
    else:
        copy_hashed(data, target[len(head) :], hasher)
    return frame


def put_chunk_frame(
    key: bytes, offset: int, data: memoryview, hasher: xxhash.xxh3_64 | None = None
) -> bytes:
    """``PutRequest{chunk: BlockChunk{key, offset, data}}`` serialized; one copy of ``data``,
    made without holding the GIL; with ``hasher``, the copy is hashed as it is made (a block
    sent in order: its checksum without a second pass)."""
    return _chunk_frame(b"\x12", key, offset, data, hasher)


def get_chunk_frame(
    key: bytes, offset: int, data: memoryview, hasher: xxhash.xxh3_64 | None = None
) -> bytes:
    """``GetResponse{chunk: BlockChunk{key, offset, data}}`` serialized, like
    :func:`put_chunk_frame` (the store hashes the copy it sends as it makes it)."""
    return _chunk_frame(b"\x0a", key, offset, data, hasher)


def parse_put_request(
    frame: bytes,
) -> tuple[tuple[bytes, int, memoryview] | None, kvstore_pb2.PutRequest | None]:
    """((key, offset, data view into ``frame``), None) for a chunk, else (None, the message)."""
    buf = memoryview(frame)
    if not frame or _read_varint(buf, 0)[0] >> 3 != 2:  # an empty frame is an empty message
        return None, kvstore_pb2.PutRequest.FromString(frame)
    tag, pos = _read_varint(buf, 0)
    length, pos = _read_varint(buf, pos)
    return _chunk_fields(buf[pos : pos + length]), None


def parse_get_response(frame: bytes) -> tuple[memoryview | None, kvstore_pb2.GetBlockEnd | None]:
    """(chunk data as a view into ``frame``, None) or (None, the block's end message)."""
    buf = memoryview(frame)
    tag, pos = _read_varint(buf, 0)
    length, pos = _read_varint(buf, pos)
    body = buf[pos : pos + length]
    if tag >> 3 == 2:
        return None, kvstore_pb2.GetBlockEnd.FromString(bytes(body))
    return _chunk_fields(body)[2], None


def _chunk_fields(body: memoryview) -> tuple[bytes, int, memoryview]:
    """(key, offset, data view) of a serialized BlockChunk; unknown fields are skipped."""
    pos, key, offset, data = 0, b"", 0, body[0:0]
    while pos < len(body):
        tag, pos = _read_varint(body, pos)
        if tag & 7 == _VARINT:
            value, pos = _read_varint(body, pos)
            if tag >> 3 == 2:
                offset = value
            continue
        length, pos = _read_varint(body, pos)
        if tag >> 3 == 1:
            key = bytes(body[pos : pos + length])
        elif tag >> 3 == 3:
            data = body[pos : pos + length]
        pos += length
    return key, offset, data
