"""The one place where the scheduler's plan meets tensors: packs a step's chunks into a varlen
batch, runs the model over the paged KV pool, and returns the logits of the rows to sample."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass

import numpy as np
import torch

from pdserve.engine.attention import AttentionMetadata, PrefillSegment, select_backend
from pdserve.engine.scheduler import SchedulerPlan
from pdserve.kv.blocks import block_nbytes
from pdserve.model.config import ModelConfig
from pdserve.model.llama import LlamaModel
from pdserve.model.quant import Linear


def model_block_nbytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block of this model across all layers (see `kv.blocks.block_nbytes`)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return block_nbytes(
        config.num_layers, block_size, config.num_kv_heads, config.head_dim, itemsize
    )


@dataclass
class StepOutput:
    request_ids: list[str]  # sequences sampled this step, in logits row order
    logits: torch.Tensor  # [len(request_ids), vocab] float32


class ModelRunner:
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        attention_backend: str | None = None,
        linears: dict[str, Linear] | None = None,
    ):
        """`linears`: quantized projections (`pdserve.model.quant`); None runs dense weights."""
        self.config = config
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.backend = select_backend(
            attention_backend, device, dtype=dtype, head_dim=config.head_dim, block_size=block_size
        )
        self.model = LlamaModel(config, weights, self.backend, device, dtype, linears)
        # [L, 2, num_blocks, block_size, KVH, D]
        self.kv_pool = torch.zeros(
            config.num_layers,
            2,
            num_blocks,
            block_size,
            config.num_kv_heads,
            config.head_dim,
            dtype=dtype,
            device=device,
        )

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def prepare(self, plan: SchedulerPlan):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillSegment] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        sample_rows: list[int] = []
        sample_ids: list[str] = []
        for chunk in plan.chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            row = len(input_ids)
            input_ids.extend(seq.tokens_in_range(start, start + n))
            positions.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if n == 1 and start > 0:
                decode_rows.append(row)
                decode_tables.append(table[: -(-(start + 1) // bs)])
                decode_lens.append(start + 1)
            else:
                used = table[: -(-(start + n) // bs)]
                prefills.append(PrefillSegment(row, n, start + n, self._tensor(used)))
            if chunk.samples:
                sample_rows.append(row + n - 1)
                sample_ids.append(seq.request_id)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            prefills=prefills,
            decode_token_index=self._tensor(decode_rows),
            decode_block_tables=self._pad_tables(decode_tables),
            decode_context_lens=self._tensor(decode_lens),
            decode_mask=self._decode_mask(decode_lens),
            decode_max_len=max(decode_lens, default=0),
        )
        return self._tensor(input_ids), self._tensor(positions), meta, sample_rows, sample_ids

    def _pad_tables(self, tables: list[list[int]]) -> torch.Tensor:
        width = max((len(t) for t in tables), default=0)
        return self._tensor([t + [0] * (width - len(t)) for t in tables]).view(len(tables), width)

    def _decode_mask(self, lens: list[int]) -> torch.Tensor | None:
        if not lens or min(lens) == max(lens):
            return None
        width = max(lens)
        key_positions = torch.arange(width, device=self.device)
        return (key_positions.unsqueeze(0) < self._tensor(lens).unsqueeze(1)).view(
            len(lens), 1, 1, width
        )

    def execute(
        self, plan: SchedulerPlan, on_layer_done: Callable[[int], None] | None = None
    ) -> StepOutput:
        input_ids, positions, meta, sample_rows, sample_ids = self.prepare(plan)
        hidden = self.model.forward(input_ids, positions, self.kv_pool, meta, on_layer_done)
        logits = self.model.compute_logits(hidden[self._tensor(sample_rows)])
        return StepOutput(sample_ids, logits)

    # -- block export / import (the unit the KV store and the handoff move) -------------------
    def read_block(self, block_id: int) -> bytes:
        block = self.kv_pool[:, :, block_id].contiguous()  # [L, 2, block_size, KVH, D]
        return block.cpu().view(torch.uint8).numpy().tobytes()

    def write_block(self, block_id: int, payload: bytes) -> None:
        block = self.kv_pool[:, :, block_id]
        expected = block.numel() * self.kv_pool.element_size()
        if len(payload) != expected:
            raise ValueError(f"KV block payload must be {expected} bytes, got {len(payload)}")
        self._copy_in(block, payload)

    def read_blocks(self, block_ids: SequenceABC[int]) -> list[bytes]:
        return [self.read_block(b) for b in block_ids]

    def read_layer(self, layer: int, block_ids: SequenceABC[int]) -> list[bytes]:
        """One layer's slice of each block: [2, block_size, KVH, D] bytes, which sits at byte
        offset `layer * layer_nbytes` of the whole block's payload."""
        index = torch.tensor(list(block_ids), device=self.device)
        slices = self.kv_pool[layer].index_select(1, index).transpose(0, 1).contiguous().cpu()
        return [s.view(torch.uint8).numpy().tobytes() for s in slices]

    @property
    def layer_nbytes(self) -> int:
        return self.kv_pool[0, :, 0].numel() * self.kv_pool.element_size()

    def write_layer(self, layer: int, block_ids: SequenceABC[int], payloads) -> None:
        """The inverse of `read_layer`: one layer's slice of each block, from bytes."""
        for block_id, payload in zip(block_ids, payloads, strict=True):
            if len(payload) != self.layer_nbytes:
                raise ValueError(f"a layer slice is {self.layer_nbytes} bytes, got {len(payload)}")
            self._copy_in(self.kv_pool[layer, :, block_id], payload)

    def _copy_in(self, target: torch.Tensor, payload) -> None:
        """Copy bytes laid out as ``target`` (a view into the pool) into it. On a CPU numpy
        reads any buffer, a kvstore's read-only segment or ``bytes`` included, without a copy
        (torch.frombuffer wants a writable one and warns otherwise)."""
        if self.device.type == "cpu":
            pool_bytes = target.view(torch.uint8).numpy()
            np.copyto(pool_bytes, np.frombuffer(payload, dtype=np.uint8).reshape(pool_bytes.shape))
            return
        data = bytearray(payload) if memoryview(payload).readonly else payload
        target.copy_(torch.frombuffer(data, dtype=torch.uint8).view(self.dtype).view(target.shape))

    def write_layers(self, layers: range, block_ids: SequenceABC[int], data) -> None:
        """Layers `layers` of each block in one copy: `data` holds, block after block, those
        layers' slices in order (each block's bytes `[layers.start * layer_nbytes,
        layers.stop * layer_nbytes)` of its payload)."""
        n, k = len(block_ids), len(layers)
        if len(data) != n * k * self.layer_nbytes:
            raise ValueError(f"{n} blocks x {k} layers need {n * k * self.layer_nbytes} bytes")
        if self.device.type == "cpu":
            # numpy reads any buffer, a kvstore's read-only segment included, without a copy
            # (torch.frombuffer wants a writable one); the pool is written through a byte view
            pool_bytes = self.kv_pool[layers.start : layers.stop].view(torch.uint8).numpy()
            raw = np.frombuffer(data, dtype=np.uint8).reshape(n, k, *pool_bytes[:, :, 0].shape[1:])
            for block_id, block in zip(block_ids, raw, strict=True):
                np.copyto(pool_bytes[:, :, block_id], block)  # one strided copy, GIL released
            return
        data = bytearray(data) if memoryview(data).readonly else data
        shape = (n, k, *self.kv_pool[0, :, 0].shape)  # [blocks, layers, 2, block_size, KVH, D]
        raw = torch.frombuffer(data, dtype=torch.uint8).view(self.dtype).view(shape)
        pool = self.kv_pool[layers.start : layers.stop]  # [layers, 2, blocks, ...], a view
        for block_id, block in zip(block_ids, raw.to(self.device), strict=True):
            pool[:, :, block_id] = block  # a plain strided copy: 2.6x faster than index_put
