"""Layer copies for the KV save side: the host copier gives the bytes `read_layer` gives; on
CUDA the side-stream copier gives the same bytes, in layer order, without waiting in `start`."""

import pytest
import torch

from pdserve.engine.layer_copy import CudaLayerCopier, HostLayerCopier, make_layer_copier

LAYERS, BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 3, 10, 4, 2, 8


def make_pool(device, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    shape = (LAYERS, 2, BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return torch.randn(shape, generator=g).to(device, dtype)


def expected_payloads(pool, layer, block_ids):
    """Per block: its K then its V slice of `layer`, as bytes (the KVSaver layout)."""
    host = pool[layer].cpu()
    return [
        host[0, b].contiguous().view(torch.uint8).numpy().tobytes()
        + host[1, b].contiguous().view(torch.uint8).numpy().tobytes()
        for b in block_ids
    ]


def test_host_copier_hands_each_layer_on_at_once_in_order():
    pool = make_pool("cpu")
    copier = make_layer_copier(torch.device("cpu"))
    assert isinstance(copier, HostLayerCopier)
    copier.start(0, pool[0], [7, 2])
    assert copier.ready() == [(0, expected_payloads(pool, 0, [7, 2]))]
    assert copier.ready() == []
    copier.start(1, pool[1], [7, 2])
    copier.start(2, pool[2], [5])
    assert copier.drain() == [
        (1, expected_payloads(pool, 1, [7, 2])),
        (2, expected_payloads(pool, 2, [5])),
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copier_matches_host_bytes_after_the_layer_write():
    device = torch.device("cuda")
    pool = make_pool(device)
    copier = make_layer_copier(device)
    assert isinstance(copier, CudaLayerCopier)
    done = []
    for layer in range(LAYERS):
        # the "layer write" on the compute stream, queued right before the copy
        pool[layer, :, 3].fill_(layer + 1)
        copier.start(layer, pool[layer], [3, 9, 0])
        done += copier.ready()
    done += copier.drain()
    assert [layer for layer, _ in done] == list(range(LAYERS))
    for layer, payloads in done:
        assert payloads == expected_payloads(pool, layer, [3, 9, 0])
    assert copier.drain() == []
