"""Device → host copies of one layer's slice of KV blocks, for the save side of the KV
connector (a prefill worker shipping each layer as soon as it is written).

On the CPU the copy is the slice itself, done at once. On CUDA a per-layer `.cpu()` would
stall the host until the GPU drained every kernel queued so far, once per layer; instead each
layer's slice is copied on a side stream, ordered after the layer's KV write by an event, into
pinned host memory (PyTorch's caching host allocator reuses it), and handed on only once its
own event has completed: `ready()` never waits, `drain()` waits for the rest at step end.

Payload layout (what `KVSaver.save_layer` receives): per block, `[2, block_size, KVH, D]` bytes.
"""

from __future__ import annotations

import collections
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

LayerPayloads = tuple[int, list[memoryview]]  # (layer, one payload per block)


def _block_slices(kv_layer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # kv_layer [2, num_blocks, block_size, KVH, D] → [n, 2, block_size, KVH, D] contiguous
    return kv_layer.index_select(1, index).transpose(0, 1).contiguous()


def _payloads(slices: torch.Tensor) -> list[memoryview]:
    # Views into the fresh contiguous copy, each keeping it alive: the slice is copied once
    # (by _block_slices), not a second time into `bytes`.
    rows = slices.view(torch.uint8).reshape(len(slices), -1).numpy()  # [n, layer_nbytes]
    return [memoryview(row) for row in rows]


class LayerCopier(ABC):
    """Order: payloads come out in the order their layers went in."""

    @abstractmethod
    def start(self, layer: int, kv_layer: torch.Tensor, block_ids: Sequence[int]) -> None:
        """Queue layer `layer`'s slice of `block_ids`; called after the layer wrote its KV."""

    @abstractmethod
    def ready(self) -> list[LayerPayloads]:
        """The queued layers whose copies have finished (never waits)."""

    @abstractmethod
    def drain(self) -> list[LayerPayloads]:
        """Every queued layer, waiting for copies still in flight."""


class HostLayerCopier(LayerCopier):
    """The pool is in host memory: the copy is done by `start`."""

    def __init__(self) -> None:
        self._done: list[LayerPayloads] = []

    def start(self, layer, kv_layer, block_ids):
        index = torch.tensor(list(block_ids), dtype=torch.int64)
        self._done.append((layer, _payloads(_block_slices(kv_layer, index))))

    def ready(self):
        done, self._done = self._done, []
        return done

    def drain(self):
        return self.ready()


@dataclass
class _InFlight:
    layer: int
    host: torch.Tensor  # pinned [n, 2, block_size, KVH, D]
    done: torch.cuda.Event


class CudaLayerCopier(LayerCopier):
    """Side-stream copies into pinned host buffers; no host synchronisation in `start`."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._stream = torch.cuda.Stream(device)
        self._pending: collections.deque[_InFlight] = collections.deque()

    def start(self, layer, kv_layer, block_ids):
        written = torch.cuda.current_stream(self._device).record_event()
        index = torch.tensor(list(block_ids), dtype=torch.int64).pin_memory()
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(written)  # the layer's KV write happens-before the copy
            # allocated on the side stream, so freeing it below waits for this stream's work
            slices = _block_slices(kv_layer, index.to(self._device, non_blocking=True))
            host = torch.empty(slices.shape, dtype=slices.dtype, pin_memory=True)
            host.copy_(slices, non_blocking=True)
            done = self._stream.record_event()
        self._pending.append(_InFlight(layer, host, done))

    def ready(self):
        out = []
        while self._pending and self._pending[0].done.query():
            item = self._pending.popleft()
            out.append((item.layer, _payloads(item.host)))
        return out

    def drain(self):
        out = []
        while self._pending:
            item = self._pending.popleft()
            item.done.synchronize()
            out.append((item.layer, _payloads(item.host)))
        return out


def make_layer_copier(device: torch.device) -> LayerCopier:
    return CudaLayerCopier(device) if device.type == "cuda" else HostLayerCopier()
