"""int8 KV compression on the wire: the codec's error bound per head, and a gRPC Get that asks
for it (the store keeps exact blocks)."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.kv.compression import KVGeometry, decode_int8, encode_int8
from pdserve.kv.errors import InvalidBlockError
from pdserve.kv.grpc_transport import GrpcTransport
from tests.kvstore.helpers import BLOCK, key, running_server

GEOMETRY = KVGeometry(num_layers=2, block_size=4, num_kv_heads=2, head_dim=32, dtype="float32")


def kv_values(geometry: KVGeometry, seed: int) -> np.ndarray:
    """Heads of very different magnitudes, as real K and V have: [L, 2, T, H, D] fp32."""
    rng = np.random.default_rng(seed)
    magnitude = 10.0 ** rng.uniform(
        -3, 2, size=(geometry.num_layers, 2, 1, geometry.num_kv_heads, 1)
    )
    return (rng.standard_normal(geometry.shape) * magnitude).astype(np.float32)


def as_dtype(values: np.ndarray, dtype: str) -> bytes:
    import torch

    return torch.from_numpy(values).to(getattr(torch, dtype)).view(torch.uint8).numpy().tobytes()


def from_dtype(raw: bytes, dtype: str) -> np.ndarray:
    import torch

    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, dtype))
    return t.to(torch.float32).numpy()


@pytest.mark.parametrize("dtype, ratio", [("float32", 4), ("bfloat16", 2), ("float16", 2)])
def test_round_trip_is_within_half_a_step_of_each_heads_scale(dtype, ratio):
    g = KVGeometry(num_layers=3, block_size=16, num_kv_heads=3, head_dim=64, dtype=dtype)
    values = kv_values(g, seed=1)
    block = as_dtype(values, dtype)
    original = from_dtype(block, dtype).reshape(g.shape)
    encoded = encode_int8(block, g)
    assert len(block) == g.block_nbytes and len(encoded) == g.int8_nbytes
    assert len(block) / len(encoded) > ratio * 0.98  # the scales are the only overhead
    decoded = from_dtype(decode_int8(encoded, g), dtype).reshape(g.shape)
    step = np.abs(original).max(axis=(2, 4), keepdims=True) / 127  # one per (layer, K/V, head)
    rounding = 0 if dtype == "float32" else np.abs(original) * 2.0**-7  # back to 8-bit mantissa
    assert np.all(np.abs(decoded - original) <= step / 2 + rounding + 1e-12)
    assert not np.array_equal(decoded, original)  # lossy: the test would notice a no-op


def test_a_zero_head_stays_exactly_zero():
    values = kv_values(GEOMETRY, seed=2)
    values[1, 0, :, 1, :] = 0.0  # layer 1, K, head 1
    decoded = np.frombuffer(
        decode_int8(encode_int8(values.tobytes(), GEOMETRY), GEOMETRY), np.float32
    )
    assert np.all(decoded.reshape(GEOMETRY.shape)[1, 0, :, 1, :] == 0.0)


def test_sizes_and_dtypes_are_checked():
    with pytest.raises(ValueError, match="4096 bytes, got 4095"):
        encode_int8(bytes(4095), GEOMETRY)
    with pytest.raises(ValueError, match="dtype must be one of"):
        KVGeometry(1, 1, 1, 1, "int8")


@pytest.fixture
def server(tmp_path, redis_url, cluster_name):
    with running_server(tmp_path, redis_url, cluster_name, dram_blocks=4) as srv:
        yield srv


def test_an_int8_get_is_decoded_and_the_store_keeps_the_exact_block(server):
    assert GEOMETRY.block_nbytes == BLOCK
    address = f"127.0.0.1:{server.port}"
    values = [kv_values(GEOMETRY, seed=i) for i in range(3)]
    exact = GrpcTransport(address)
    exact.put_blocks([(key(i), v.tobytes()) for i, v in enumerate(values)])
    compressed = GrpcTransport(address, int8_geometry=GEOMETRY, streams=2)
    got = compressed.get_blocks([key(0), key(9), key(1), key(2)])
    assert got[1] is None
    for i, data in zip((0, 1, 2), (got[0], got[2], got[3]), strict=True):
        assert data == decode_int8(encode_int8(values[i].tobytes(), GEOMETRY), GEOMETRY)
    assert [bytes(b) for b in exact.get_blocks([key(0)])] == [values[0].tobytes()]
    wrong = GrpcTransport(address, int8_geometry=KVGeometry(1, 4, 2, 32, "float32"))
    with pytest.raises(InvalidBlockError, match="2048-byte blocks; this store holds 4096"):
        wrong.get_blocks([key(0)])
    for transport in (exact, compressed, wrong):
        transport.close()
