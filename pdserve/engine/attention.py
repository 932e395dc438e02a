"""Attention backends over the paged KV pool.

Pool layout (per layer): k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim],
so pool[layer, 0|1, block] is one block's K|V and a whole block across layers is
`[num_layers, 2, block_size, num_kv_heads, head_dim]` (the unit the KV store moves).

A step's batch is varlen-packed: T tokens from several sequences. Sequences with one new token
(decodes) are attended together over their gathered blocks; sequences with several new tokens
(prefill chunks) are attended one by one, causally, after their chunk KV is written.

Backends: `flash` (flash-attn varlen + paged kernels; CUDA only), `sdpa` (torch
scaled_dot_product_attention; PyTorch's own FlashAttention kernel on CUDA), `reference` (plain
math, the yardstick for tests). Which one runs, and why, is `device_selection.choose_backend`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch
import torch.nn.functional as F

from pdserve import cpu_kernels
from pdserve.engine.device_selection import (
    FLASH_PAGE_MULTIPLE,
    DeviceFacts,
    choose_backend,
    flash_unsupported,
)

log = structlog.get_logger(__name__)


@dataclass
class PrefillSegment:
    token_start: int  # first row of this sequence in the packed batch
    num_tokens: int  # new tokens computed in this step
    context_len: int  # tokens in the cache after this step (cached prefix + new)
    block_table: torch.Tensor  # [num_blocks_of_seq] int64


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: pool slot (block * block_size + offset) per new token
    prefills: list[PrefillSegment]
    decode_token_index: torch.Tensor  # [Bd] rows of the packed batch that are decodes
    decode_block_tables: torch.Tensor  # [Bd, max_blocks] int64 (padded with 0)
    decode_context_lens: torch.Tensor  # [Bd] int64
    # [Bd, 1, 1, decode_max_len] bool, True = attend; None when every decode has that length
    decode_mask: torch.Tensor | None
    decode_max_len: int = 0

    @property
    def num_decodes(self) -> int:
        return int(self.decode_token_index.numel())


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    k_cache.view(num_blocks * block_size, kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(num_blocks * block_size, kv_heads, head_dim).index_copy_(0, slots, v)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """[length, kv_heads, head_dim] tokens of one sequence, in position order."""
    _, block_size, kv_heads, head_dim = cache.shape
    return cache.index_select(0, block_table).reshape(-1, kv_heads, head_dim)[:length]


class AttentionBackend(ABC):
    name: str
    # The CPU kernels (`pdserve.cpu_kernels`) whose paged decode attention a pure-decode step
    # runs; None: the backend attends with its own ops. The model's decode stack needs them.
    native = None

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KVH, D]
        v: torch.Tensor,  # [T, KVH, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, H, D]
        """Write this step's K/V into the pool, then attend every new token to its context."""


class _GatheringBackend(AttentionBackend):
    """Shared driver for backends that gather context from the pool on the host side."""

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q) if meta.prefills else q
        for seg in meta.prefills:
            rows = slice(seg.token_start, seg.token_start + seg.num_tokens)
            if seg.context_len == seg.num_tokens:
                ctx_k, ctx_v = k[rows], v[rows]
            else:
                ctx_k = gather_context(k_cache, seg.block_table, seg.context_len)
                ctx_v = gather_context(v_cache, seg.block_table, seg.context_len)
            out[rows] = self.prefill(q[rows], ctx_k, ctx_v, scale)
        if meta.num_decodes:
            q_dec = q.index_select(0, meta.decode_token_index)  # [Bd, H, D]
            o = self.decode_paged(q_dec, k_cache, v_cache, meta, scale)
            if not meta.prefills:  # a pure decode step: rows are the decodes, in order
                return o
            out.index_copy_(0, meta.decode_token_index, o)
        return out

    def decode_paged(self, q, k_cache, v_cache, meta, scale) -> torch.Tensor:
        """q [Bd, H, D] of the step's decodes → [Bd, H, D]: their contexts gathered from the
        pool into one padded batch for `decode`."""
        bd = q.shape[0]
        _, block_size, kv_heads, head_dim = k_cache.shape
        length = meta.decode_max_len
        # index_select over the flattened table: a third of advanced indexing's time on
        # the CPU (60 calls a decode step for a 30-layer model).
        blocks = meta.decode_block_tables.view(-1)
        ctx_k = k_cache.index_select(0, blocks).view(bd, -1, kv_heads, head_dim)[:, :length]
        ctx_v = v_cache.index_select(0, blocks).view(bd, -1, kv_heads, head_dim)[:, :length]
        ctx_k, ctx_v = ctx_k.transpose(1, 2), ctx_v.transpose(1, 2)  # [Bd, KVH, L, D]
        return self.decode(q.unsqueeze(2), ctx_k, ctx_v, meta.decode_mask, scale).squeeze(2)

    @abstractmethod
    def prefill(self, q, k, v, scale) -> torch.Tensor:
        """q [S, H, D], k/v [L, KVH, D] with L ≥ S; the S queries are the last S positions."""

    @abstractmethod
    def decode(self, q, k, v, mask, scale) -> torch.Tensor:
        """q [B, H, 1, D], k/v [B, KVH, L, D], mask [B, 1, 1, L] bool or None (attend all)."""


def _causal_mask(num_queries: int, num_keys: int, device) -> torch.Tensor:
    """[S, L] bool: query i (at position L - S + i) sees keys 0..L - S + i."""
    offset = num_keys - num_queries
    rows = torch.arange(num_queries, device=device).unsqueeze(1)
    cols = torch.arange(num_keys, device=device).unsqueeze(0)
    return cols <= rows + offset


class SdpaBackend(_GatheringBackend):
    """`native`: the CPU kernels (`pdserve.cpu_kernels`), whose decode attention reads a bf16
    pool in place through the block tables instead of gathering each context first."""

    name = "sdpa"

    def __init__(self, native=None):
        self.native = native

    def _native_fits(self, q, k_cache) -> bool:
        return (
            self.native is not None
            and q.dtype == torch.bfloat16
            and self.native.supports_attention(q.shape[1], k_cache.shape[2], q.shape[2])
        )

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        if meta.prefills or not self._native_fits(q, k_cache):
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)
        # A pure decode step (rows are the decodes, in order): the kernel writes each new
        # token's K/V into its slot and attends, in one call per layer.
        return self.native.paged_decode_attention(
            q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale,
            new_kv=(k, v, meta.slot_mapping),
        )  # fmt: skip

    def decode_paged(self, q, k_cache, v_cache, meta, scale):
        if not self._native_fits(q, k_cache):
            return super().decode_paged(q, k_cache, v_cache, meta, scale)
        return self.native.paged_decode_attention(
            q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale
        )

    def prefill(self, q, k, v, scale):
        num_queries, num_keys = q.shape[0], k.shape[0]
        # Expanding KV heads beats enable_gqa for many queries (CPU: ~25 % at 512 tokens) and
        # gives bit-identical results; decode keeps enable_gqa, where expanding is far slower.
        # A leading batch dimension matters: 3-D inputs miss PyTorch's fused CPU kernel and
        # take the quadratic-memory math path (~6x slower at 2,048 tokens).
        group = q.shape[1] // k.shape[1]
        qt = q.transpose(0, 1).unsqueeze(0)  # [1, H, S, D]
        kt = k.transpose(0, 1).repeat_interleave(group, dim=0).unsqueeze(0)  # [1, H, L, D]
        vt = v.transpose(0, 1).repeat_interleave(group, dim=0).unsqueeze(0)
        if num_queries == num_keys:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
        else:
            mask = _causal_mask(num_queries, num_keys, q.device)
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
        return o.squeeze(0).transpose(0, 1)

    def decode(self, q, k, v, mask, scale):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


class ReferenceBackend(_GatheringBackend):
    name = "reference"

    @staticmethod
    def _attend(q, k, v, mask, scale):
        # q [..., H, S, D], k/v [..., KVH, L, D], mask broadcastable to [..., H, S, L]
        group = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(group, dim=-3)
        v = v.repeat_interleave(group, dim=-3)
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.softmax(-1) @ v.float()).to(q.dtype)

    def prefill(self, q, k, v, scale):
        mask = _causal_mask(q.shape[0], k.shape[0], q.device)
        o = self._attend(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask, scale)
        return o.transpose(0, 1)

    def decode(self, q, k, v, mask, scale):
        return self._attend(q, k, v, mask, scale)


@dataclass
class FlashPrefillInputs:
    """The fresh prefill chunks (no cached context) of a step, packed for one varlen call."""

    rows: slice | torch.Tensor  # their rows of the packed batch (a slice when contiguous)
    cu_seqlens: torch.Tensor  # [num_fresh + 1] int32, row offsets into the packed chunks
    max_seqlen: int


def flash_prefill_inputs(
    prefills: list[PrefillSegment], device: torch.device
) -> FlashPrefillInputs | None:
    fresh = [s for s in prefills if s.context_len == s.num_tokens]
    if not fresh:
        return None
    rows = [r for s in fresh for r in range(s.token_start, s.token_start + s.num_tokens)]
    offsets = [0]
    for s in fresh:
        offsets.append(offsets[-1] + s.num_tokens)
    contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
    return FlashPrefillInputs(
        slice(rows[0], rows[0] + len(rows))
        if contiguous
        else torch.tensor(rows, dtype=torch.int64, device=device),
        torch.tensor(offsets, dtype=torch.int32, device=device),
        max(s.num_tokens for s in fresh),
    )


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[B, max_blocks * block_size, KVH, D]: each sequence's blocks laid end to end (padding
    entries of the table gather block 0, which the kernel's cache_seqlens masks off)."""
    b, max_blocks = block_tables.shape
    _, block_size, kv_heads, head_dim = cache.shape
    return cache[block_tables].view(b, max_blocks * block_size, kv_heads, head_dim)


class FlashBackend(AttentionBackend):
    """flash-attn 2 on CUDA: one varlen call over every fresh prefill chunk of the step (packed),
    and `flash_attn_with_kvcache` for decodes and for chunks after a cached prefix (causal is
    bottom-right aligned there, so the chunk's queries are the last positions of its context).
    The kernel reads the pool through the block table when the block size is a multiple of 256
    (its `page_block_size` check); smaller blocks are gathered into a contiguous buffer first.

    `varlen` / `with_kvcache` default to flash-attn's kernels; tests pass functions with the
    same documented contract to check the inputs this class builds on a CPU."""

    name = "flash"

    def __init__(self, varlen: Callable | None = None, with_kvcache: Callable | None = None):
        if varlen is None or with_kvcache is None:
            from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

            varlen, with_kvcache = flash_attn_varlen_func, flash_attn_with_kvcache
        self._varlen = varlen
        self._with_kvcache = with_kvcache

    def _attend_cached(self, q, k_cache, v_cache, block_tables, context_lens, scale):
        # q [B, S, H, D]; block_tables [B, max_blocks]; context_lens [B] → [B, S, H, D]
        seqlens = context_lens.to(torch.int32)
        if k_cache.shape[1] % FLASH_PAGE_MULTIPLE == 0:
            return self._with_kvcache(
                q,
                k_cache,
                v_cache,
                cache_seqlens=seqlens,
                block_table=block_tables.to(torch.int32).contiguous(),
                softmax_scale=scale,
                causal=True,
            )
        k = gather_blocks(k_cache, block_tables)
        v = gather_blocks(v_cache, block_tables)
        return self._with_kvcache(q, k, v, cache_seqlens=seqlens, softmax_scale=scale, causal=True)

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        fresh = flash_prefill_inputs(meta.prefills, q.device)
        if fresh is not None:
            cu, n = fresh.cu_seqlens, fresh.max_seqlen
            out[fresh.rows] = self._varlen(
                q[fresh.rows], k[fresh.rows], v[fresh.rows], cu, cu, n, n,
                softmax_scale=scale, causal=True,
            )  # fmt: skip
        for seg in meta.prefills:
            if seg.context_len == seg.num_tokens:
                continue
            rows = slice(seg.token_start, seg.token_start + seg.num_tokens)
            lens = torch.tensor([seg.context_len], device=q.device)
            out[rows] = self._attend_cached(
                q[rows].unsqueeze(0), k_cache, v_cache, seg.block_table.unsqueeze(0), lens, scale
            ).squeeze(0)
        if meta.num_decodes:
            q_dec = q.index_select(0, meta.decode_token_index).unsqueeze(1)  # [Bd, 1, H, D]
            o = self._attend_cached(
                q_dec, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale
            )
            out.index_copy_(0, meta.decode_token_index, o.squeeze(1))
        return out


def _flash_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def device_facts(device: torch.device) -> DeviceFacts:
    """What the backend choice needs to know about `device` (read once, at engine start)."""
    if device.type != "cuda":
        return DeviceFacts(device.type)
    return DeviceFacts(
        "cuda",
        torch.cuda.get_device_capability(device),
        _flash_importable(),
        torch.cuda.get_device_name(device),
    )


def flash_available(device: torch.device) -> bool:
    """flash-attn is installed and runs on `device` (for a half-precision model it supports)."""
    return flash_unsupported(device_facts(device), "bfloat16", 64) is None


def select_backend(
    name: str | None, device: torch.device, *, dtype: torch.dtype, head_dim: int, block_size: int
) -> AttentionBackend:
    """`None`/"auto": flash where it supports the device, dtype and head size, else sdpa
    (`device_selection.choose_backend`); logs which and why. A forced backend that cannot run
    here raises ValueError."""
    facts = device_facts(device)
    dtype_name = str(dtype).removeprefix("torch.")
    choice = choose_backend(name, facts, dtype_name, head_dim, block_size)
    log.info(
        "attention.backend",
        backend=choice.name,
        reason=choice.reason,
        device=facts.name or facts.kind,
        dtype=dtype_name,
    )
    if choice.name == "sdpa":
        return SdpaBackend(_native_kernels(device, dtype))
    backends = {"flash": FlashBackend, "reference": ReferenceBackend}
    return backends[choice.name]()


def _native_kernels(device: torch.device, dtype: torch.dtype):
    """The CPU kernels where the pool is bf16 on the CPU; the exact fp32 path keeps SDPA, whose
    sums the Hugging Face oracle tests compare token for token."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return None
    native = cpu_kernels.kernels()
    if native is not None:
        log.info("attention.decode", kernel=f"native paged ({native.isa})")
    return native


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
