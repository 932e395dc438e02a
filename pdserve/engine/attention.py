"""Attention backends over the paged KV pool.

Pool layout (per layer): k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim],
so pool[layer, 0|1, block] is one block's K|V and a whole block across layers is
`[num_layers, 2, block_size, num_kv_heads, head_dim]` (the unit the KV store moves).

A step's batch is varlen-packed: T tokens from several sequences. Sequences with one new token
(decodes) are attended together over their gathered blocks; sequences with several new tokens
(prefill chunks) are attended one by one, causally, after their chunk KV is written.

Backends: `flash` (flash-attn varlen + paged kernels; CUDA only), `sdpa` (torch
scaled_dot_product_attention; PyTorch's own FlashAttention kernel on CUDA), `reference` (plain
math, the yardstick for tests).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
            bd, max_blocks = meta.decode_block_tables.shape
            _, block_size, kv_heads, head_dim = k_cache.shape
            # [Bd, L, KVH, D] → [Bd, KVH, L, D]
            length = meta.decode_max_len
            ctx_k = k_cache[meta.decode_block_tables].view(bd, -1, kv_heads, head_dim)[:, :length]
            ctx_v = v_cache[meta.decode_block_tables].view(bd, -1, kv_heads, head_dim)[:, :length]
            ctx_k, ctx_v = ctx_k.transpose(1, 2), ctx_v.transpose(1, 2)
            q_dec = q.index_select(0, meta.decode_token_index).unsqueeze(2)  # [Bd, H, 1, D]
            o = self.decode(q_dec, ctx_k, ctx_v, meta.decode_mask, scale)  # [Bd, H, 1, D]
            if not meta.prefills:  # a pure decode step: rows are the decodes, in order
                return o.squeeze(2)
            out.index_copy_(0, meta.decode_token_index, o.squeeze(2))
        return out

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
    name = "sdpa"

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


class FlashBackend(AttentionBackend):
    """flash-attn 2 on CUDA: the varlen kernel for prefill chunks without cached context and
    `flash_attn_with_kvcache` for decodes and chunks with a cached prefix. Upstream flash-attn
    reads a paged cache directly only when the page size is a multiple of 256; for smaller
    blocks the context is gathered into a contiguous buffer first."""

    name = "flash"

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        self._varlen = flash_attn_varlen_func
        self._with_kvcache = flash_attn_with_kvcache

    def _attend_cached(self, q, k_cache, v_cache, block_tables, context_lens, scale):
        # q [B, S, H, D]; block_tables [B, max_blocks]; context_lens [B]
        seqlens = context_lens.to(torch.int32)
        if k_cache.shape[1] % 256 == 0:
            return self._with_kvcache(
                q,
                k_cache,
                v_cache,
                cache_seqlens=seqlens,
                block_table=block_tables.to(torch.int32),
                softmax_scale=scale,
                causal=True,
            )
        b, max_blocks = block_tables.shape
        _, block_size, kv_heads, head_dim = k_cache.shape
        k = k_cache[block_tables].view(b, max_blocks * block_size, kv_heads, head_dim)
        v = v_cache[block_tables].view(b, max_blocks * block_size, kv_heads, head_dim)
        return self._with_kvcache(q, k, v, cache_seqlens=seqlens, softmax_scale=scale, causal=True)

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        for seg in meta.prefills:
            rows = slice(seg.token_start, seg.token_start + seg.num_tokens)
            if seg.context_len == seg.num_tokens:
                cu = torch.tensor([0, seg.num_tokens], dtype=torch.int32, device=q.device)
                out[rows] = self._varlen(
                    q[rows],
                    k[rows],
                    v[rows],
                    cu,
                    cu,
                    seg.num_tokens,
                    seg.num_tokens,
                    softmax_scale=scale,
                    causal=True,
                )
            else:
                lens = torch.tensor([seg.context_len], device=q.device)
                out[rows] = self._attend_cached(
                    q[rows].unsqueeze(0),
                    k_cache,
                    v_cache,
                    seg.block_table.unsqueeze(0),
                    lens,
                    scale,
                ).squeeze(0)
        if meta.num_decodes:
            q_dec = q.index_select(0, meta.decode_token_index).unsqueeze(1)  # [Bd, 1, H, D]
            o = self._attend_cached(
                q_dec, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale
            )
            out.index_copy_(0, meta.decode_token_index, o.squeeze(1))
        return out


def flash_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(name: str | None, device: torch.device) -> AttentionBackend:
    """`None`/"auto": flash when importable on CUDA, else sdpa."""
    if name in (None, "auto"):
        name = "flash" if flash_available(device) else "sdpa"
    if name == "flash":
        if not flash_available(device):
            raise ValueError("attention backend 'flash' needs CUDA and the flash-attn package")
        return FlashBackend()
    if name == "sdpa":
        return SdpaBackend()
    if name == "reference":
        return ReferenceBackend()
    raise ValueError(f"attention backend must be one of auto, flash, sdpa, reference; got {name!r}")


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
