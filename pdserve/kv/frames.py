"""Pre-encoded KVStore stream frames: block bytes go from the caller's buffer to the wire (and
back) with one copy, instead of a copy into a protobuf message, another at serialization
and a third when the received pieces are joined.

Only the two bulk messages are hand-framed, and they are exactly the protobuf wire encoding
of ``PutRequest{chunk: BlockChunk{key, offset, data}}`` and of ``GetResponse`` (chunk or end),
so the server side is untouched. tests/kvstore/test_frames.py checks both against protobuf.
"""

from __future__ import annotations

from pdserve._proto.pdserve.v1 import kvstore_pb2

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


def put_chunk_frame(key: bytes, offset: int, data: memoryview) -> bytes:
    """``PutRequest{chunk: BlockChunk{key, offset, data}}`` serialized; one copy of ``data``."""
    inner_head = b"\x0a" + _varint(len(key)) + key
    if offset:
        inner_head += b"\x10" + _varint(offset)
    if len(data):  # protobuf omits an empty bytes field
        inner_head += b"\x1a" + _varint(len(data))
    inner_len = len(inner_head) + len(data)
    return b"".join((b"\x12", _varint(inner_len), inner_head, data))


def parse_get_response(frame: bytes) -> tuple[memoryview | None, kvstore_pb2.GetBlockEnd | None]:
    """(chunk data as a view into ``frame``, None) or (None, the block's end message)."""
    buf = memoryview(frame)
    tag, pos = _read_varint(buf, 0)
    length, pos = _read_varint(buf, pos)
    body = buf[pos : pos + length]
    if tag >> 3 == 2:
        return None, kvstore_pb2.GetBlockEnd.FromString(bytes(body))
    return _chunk_data(body), None


def _chunk_data(body: memoryview) -> memoryview:
    """The ``data`` field of a serialized BlockChunk (key and offset are skipped)."""
    pos, data = 0, body[0:0]
    while pos < len(body):
        tag, pos = _read_varint(body, pos)
        if tag & 7 == _VARINT:
            _, pos = _read_varint(body, pos)
            continue
        length, pos = _read_varint(body, pos)
        if tag >> 3 == 3:
            data = body[pos : pos + length]
        pos += length
    return data
