"""Hand-encoded KVStore frames are byte-for-byte the protobuf encoding (put), and parse what
protobuf encodes (get), for offsets and sizes that take one- and multi-byte varints."""

from __future__ import annotations

import pytest

from pdserve._proto.pdserve.v1 import kvstore_pb2
from pdserve.kv.frames import parse_get_response, put_chunk_frame

KEY = bytes(range(16))


@pytest.mark.parametrize("offset, size", [(0, 1), (0, 127), (5, 128), (1 << 20, 1 << 20), (300, 0)])
def test_put_chunk_frame_is_the_protobuf_encoding(offset, size):
    data = bytes(i % 251 for i in range(size))
    expected = kvstore_pb2.PutRequest(
        chunk=kvstore_pb2.BlockChunk(key=KEY, offset=offset, data=data)
    ).SerializeToString()
    assert put_chunk_frame(KEY, offset, memoryview(data)) == expected


@pytest.mark.parametrize("offset, size", [(0, 1), (7, 200), (1 << 21, 1 << 20)])
def test_get_chunk_frames_parse_to_their_data(offset, size):
    data = bytes(i % 13 for i in range(size))
    frame = kvstore_pb2.GetResponse(
        chunk=kvstore_pb2.BlockChunk(key=KEY, offset=offset, data=data)
    ).SerializeToString()
    piece, end = parse_get_response(frame)
    assert end is None and bytes(piece) == data


def test_get_end_frame_parses_to_the_message():
    end = kvstore_pb2.GetBlockEnd(key=KEY, found=True, checksum=(1 << 64) - 3, tier=2)
    frame = kvstore_pb2.GetResponse(end=end).SerializeToString()
    piece, parsed = parse_get_response(frame)
    assert piece is None and parsed == end
