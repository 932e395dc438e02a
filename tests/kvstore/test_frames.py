"""Hand-encoded KVStore frames are byte-for-byte the protobuf encoding (put), and parse what
protobuf encodes (get), for offsets and sizes that take one- and multi-byte varints."""

from __future__ import annotations

import pytest
import xxhash

from pdserve._proto.pdserve.v1 import kvstore_pb2
from pdserve.kv.frames import (
    get_chunk_frame,
    parse_get_response,
    parse_put_request,
    put_chunk_frame,
)

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


@pytest.mark.parametrize("offset, size", [(0, 1), (5, 128), (1 << 21, 1 << 20), (300, 0)])
def test_get_chunk_frame_is_the_protobuf_encoding_and_ends_with_the_data(offset, size):
    data = bytes(i % 241 for i in range(size))
    expected = kvstore_pb2.GetResponse(
        chunk=kvstore_pb2.BlockChunk(key=KEY, offset=offset, data=data)
    ).SerializeToString()
    frame = get_chunk_frame(KEY, offset, memoryview(data))
    assert frame == expected
    assert frame[len(frame) - size :] == data  # what the store hashes


@pytest.mark.parametrize("offset, size", [(0, 1), (7, 200), (1 << 21, 1 << 20)])
def test_put_chunk_requests_parse_to_key_offset_and_a_view_of_the_data(offset, size):
    data = bytes(i % 7 for i in range(size))
    frame = kvstore_pb2.PutRequest(
        chunk=kvstore_pb2.BlockChunk(key=KEY, offset=offset, data=data)
    ).SerializeToString()
    chunk, message = parse_put_request(frame)
    assert message is None
    assert (chunk[0], chunk[1], bytes(chunk[2])) == (KEY, offset, data)
    assert chunk[2].obj is frame  # a view: the data is not copied out of the message


@pytest.mark.parametrize(
    "request_",
    [
        kvstore_pb2.PutRequest(header=kvstore_pb2.PutHeader(skip_existing=True)),
        kvstore_pb2.PutRequest(seal=kvstore_pb2.BlockSeal(key=KEY, checksum=(1 << 64) - 1)),
        kvstore_pb2.PutRequest(),
    ],
)
def test_other_put_requests_parse_to_the_message(request_):
    chunk, message = parse_put_request(request_.SerializeToString())
    assert chunk is None and message == request_


@pytest.mark.parametrize("size", [100, 300_000])  # a plain join, and a copy into fresh bytes
def test_frames_hash_the_bytes_they_copy(size):
    data = bytes(i % 239 for i in range(size))
    hasher = xxhash.xxh3_64()
    frame = put_chunk_frame(KEY, 0, memoryview(data), hasher)
    assert frame.endswith(data) and hasher.intdigest() == xxhash.xxh3_64_intdigest(data)
