"""Llama-family decoder (RMSNorm, rotary embeddings incl. llama3 scaling, grouped-query
attention, SwiGLU) over a paged KV pool. Numerics follow Hugging Face's LlamaModel so greedy
tokens match it; projections sharing an input are fused (QKV, gate+up) to cut kernel calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import structlog
import torch
import torch.nn.functional as F

from pdserve import cpu_kernels
from pdserve.engine.attention import AttentionBackend, AttentionMetadata, softmax_scale
from pdserve.model.config import ModelConfig
from pdserve.model.quant import (
    HEAD,
    INT4_GROUP_SIZE,
    MAX_QUANTIZED_ROWS,
    DenseLinear,
    Int4Linear,
    Int8Linear,
    Linear,
)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    )
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are scaled down by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


log = structlog.get_logger(__name__)


class RotaryEmbedding:
    def __init__(self, config: ModelConfig, device: torch.device):
        inv_freq = rope_inv_freq(config).to(device)
        positions = torch.arange(config.max_position_embeddings, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos, self.sin = emb.cos(), emb.sin()

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype):
        # → cos, sin: [T, 1, D] broadcast over heads
        return (
            self.cos.index_select(0, positions).unsqueeze(1).to(dtype),
            self.sin.index_select(0, positions).unsqueeze(1).to(dtype),
        )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class TorchLayerOps:
    """A layer's elementwise work in torch ops: the exact path (Hugging Face's numerics)."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, dtype: torch.dtype):
        self.config = config
        self.rotary = rotary
        self.dtype = dtype

    def rope_for(self, positions: torch.Tensor):
        return self.rotary(positions, self.dtype)

    def add_rms_norm(self, h, delta, weight):
        """(h + delta, RMSNorm(h + delta) · weight); delta None adds nothing."""
        if delta is not None:
            h = h + delta
        return h, rms_norm(h, weight, self.config.rms_norm_eps)

    def rotate_qk(self, qkv: torch.Tensor, rope):
        """[T, (H + 2·KVH)·D] → q [T, H, D], k, v [T, KVH, D] contiguous, q and k rotated."""
        cfg = self.config
        cos, sin = rope
        num_tokens = qkv.shape[0]
        kv_size = cfg.num_kv_heads * cfg.head_dim
        qk, v = qkv.split([qkv.shape[1] - kv_size, kv_size], dim=-1)
        # Rotate q and k heads together: one set of elementwise kernels instead of two.
        qk = qk.view(num_tokens, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
        qk = qk * cos + _rotate_half(qk) * sin
        q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=1)
        return q, k.contiguous(), v.contiguous().view(num_tokens, cfg.num_kv_heads, cfg.head_dim)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class NativeLayerOps:
    """The same work in one native call each (`pdserve.cpu_kernels`), for bf16 on the CPU:
    fp32 inside, rounded once per output, so within bf16 rounding of TorchLayerOps (RMSNorm is
    bit-identical)."""

    def __init__(self, native, config: ModelConfig, rotary: RotaryEmbedding):
        self.native = native
        self.config = config
        self.cos, self.sin = rotary.cos.contiguous(), rotary.sin.contiguous()

    def rope_for(self, positions: torch.Tensor):
        return positions.contiguous()

    def add_rms_norm(self, h, delta, weight):
        # the kernel walks rows of both as dense [rows, hidden] arrays
        h = h.contiguous()
        if delta is not None:
            delta = delta.contiguous()
        return h, self.native.add_rms_norm(h, delta, weight, self.config.rms_norm_eps)

    def rotate_qk(self, qkv: torch.Tensor, positions):
        cfg = self.config
        num_tokens, d = qkv.shape[0], cfg.head_dim
        q_size, kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        self.native.rope(qkv, cfg.num_heads + cfg.num_kv_heads, d, positions, self.cos, self.sin)
        # Views into qkv: the native attention reads strided rows, torch ops accept them.
        q = qkv[:, :q_size].view(num_tokens, cfg.num_heads, d)
        k = qkv[:, q_size : q_size + kv_size].view(num_tokens, cfg.num_kv_heads, d)
        v = qkv[:, q_size + kv_size :].view(num_tokens, cfg.num_kv_heads, d)
        return q, k, v

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.native.silu_mul(gate_up)


def _native_layer_ops(device: torch.device, dtype: torch.dtype, config: ModelConfig):
    """The CPU kernels where the model computes in bf16 on the CPU and its widths fit them."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return None
    native = cpu_kernels.kernels()
    widths = (config.hidden_size, config.intermediate_size)
    if native is None or any(w % native.lanes for w in widths) or config.head_dim % 2:
        return None
    return native


class LlamaModel:
    """`linears`: quantized projections (see `pdserve.model.quant`, keyed by `linear_names`);
    None runs the dense weights in `dtype`."""

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        backend: AttentionBackend,
        device: torch.device,
        dtype: torch.dtype,
        linears: dict[str, Linear] | None = None,
    ):
        self.config = config
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.scale = softmax_scale(config.head_dim)

        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=dtype).contiguous()

        linears = linears or _dense_linears(config, w)
        self.lm_head = linears[HEAD]
        # None: the embedding rows are the tied head's. (Not a bound method kept on self: that
        # cycle kept a dropped model's weights until the cyclic collector ran.)
        self._embed_table = (
            None
            if config.tie_word_embeddings and isinstance(self.lm_head, (DenseLinear, Int8Linear))
            else w("model.embed_tokens.weight")
        )
        self.norm = w("model.norm.weight")
        self.layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            layer = {
                name: linears[f"layers.{i}.{name}"] for name in ("qkv", "o", "gate_up", "down")
            }
            layer["input_norm"] = w(p + "input_layernorm.weight")
            layer["post_norm"] = w(p + "post_attention_layernorm.weight")
            self.layers.append(layer)
        self._pool_views: tuple[torch.Tensor, list] | None = None
        rotary = RotaryEmbedding(config, device)
        native = _native_layer_ops(device, dtype, config)
        self.ops = (
            NativeLayerOps(native, config, rotary)
            if native is not None
            else TorchLayerOps(config, rotary, dtype)
        )
        self._decode_stack = _decode_stack(self, backend)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self._embed_table is not None:
            return F.embedding(ids, self._embed_table)
        if isinstance(self.lm_head, Int8Linear):
            return self.lm_head.rows(ids, self.dtype)
        return F.embedding(ids, self.lm_head.weight)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_pool: torch.Tensor,  # [L, 2, num_blocks, block_size, KVH, D]
        meta: AttentionMetadata,
        on_layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor:  # [T, hidden]
        """`on_layer_done(i)` runs once layer i has written this step's KV into the pool, so a
        caller can ship that layer's slice of finished blocks while later layers compute."""
        if self._decode_stack is not None and not meta.prefills:
            return self._decode_forward(input_ids, positions, kv_pool, meta, on_layer_done)
        ops = self.ops
        num_tokens = input_ids.shape[0]
        rope = ops.rope_for(positions)
        h = self._embed(input_ids)  # [T, hidden]
        delta = None  # the previous layer's MLP output, added to h by the next norm
        for i, layer in enumerate(self.layers):
            h, x = ops.add_rms_norm(h, delta, layer["input_norm"])
            q, k, v = ops.rotate_qk(layer["qkv"](x), rope)
            k_cache, v_cache = self._layer_caches(kv_pool)[i]
            o = self.backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)
            h, x = ops.add_rms_norm(h, layer["o"](o.reshape(num_tokens, -1)), layer["post_norm"])
            delta = layer["down"](ops.silu_mul(layer["gate_up"](x)))
            if on_layer_done is not None:
                on_layer_done(i)
        return ops.add_rms_norm(h, delta, self.norm)[1]

    @property
    def has_decode_stack(self) -> bool:
        """Whether pure-decode steps run through the native decode stack."""
        return self._decode_stack is not None

    def _decode_forward(self, input_ids, positions, kv_pool, meta, on_layer_done):
        """A pure-decode step through the native decode stack: the same kernels in the same
        order as the layer loop above, called from C++. Every layer has written its KV when it
        returns, so `on_layer_done` runs for each layer after the last one."""
        out = self._decode_stack.forward(
            self._embed(input_ids), positions, kv_pool, meta.decode_block_tables,
            meta.decode_context_lens, meta.slot_mapping,
        )  # fmt: skip
        if on_layer_done is not None:
            for i in range(len(self.layers)):
                on_layer_done(i)
        return out

    def _layer_caches(self, kv_pool: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (K, V) views of the pool, made once per pool rather than with four
        indexing ops per layer and step."""
        if self._pool_views is None or self._pool_views[0] is not kv_pool:
            views = [(kv_pool[i, 0], kv_pool[i, 1]) for i in range(kv_pool.shape[0])]
            self._pool_views = (kv_pool, views)
        return self._pool_views[1]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [N, hidden] → [N, vocab] float32
        return self.lm_head(hidden).float()


_EMPTY = torch.empty(0)


def _stack_projection(linear: Linear) -> list[torch.Tensor] | None:
    """The forms of one projection the decode stack chooses from (see decode_stack.cpp), or
    None for a kind it does not run."""
    if isinstance(linear, Int4Linear):
        b = linear.blocks
        native = [b.qs, b.scales, b.mins] if linear.runs_native else [_EMPTY] * 3
        return [linear.packed, linear.scales_and_zeros, *native, linear.dense]
    if isinstance(linear, DenseLinear):
        return [_EMPTY] * 5 + [linear.weight]
    return None


def _decode_stack(model: LlamaModel, backend: AttentionBackend):
    """The native decode stack for this model, where its layer ops and attention are the
    native kernels and every projection is 4-bit or dense; None otherwise."""
    cfg = model.config
    native = backend.native
    if (
        not isinstance(model.ops, NativeLayerOps)
        or native is None
        or not native.supports_attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    ):
        return None
    tensors: list[torch.Tensor] = []
    for layer in model.layers:
        tensors += [layer["input_norm"], layer["post_norm"]]
        for name in ("qkv", "o", "gate_up", "down"):
            forms = _stack_projection(layer[name])
            if forms is None:
                return None
            tensors += forms
    tensors += [model.norm, model.ops.cos, model.ops.sin]
    # Only now: the first call compiles the stack (seconds), which a model it cannot run
    # (int8 projections) must not pay.
    stack_class = cpu_kernels.decode_stack_class()
    if stack_class is None:
        return None
    dims = [
        cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size,
        cfg.intermediate_size, MAX_QUANTIZED_ROWS, native.max_product_rows, INT4_GROUP_SIZE,
    ]  # fmt: skip
    stack = stack_class(tensors, dims, [cfg.rms_norm_eps, model.scale])
    log.info("model.decode_stack", kernel=f"native ({native.isa})")
    return stack


def _dense_linears(config: ModelConfig, w: Callable[[str], torch.Tensor]) -> dict[str, Linear]:
    """Projections sharing an input fused (QKV, gate+up) to cut kernel calls; the output
    projection is the embedding table itself when tied."""
    parts = {
        "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "o": ("self_attn.o_proj",),
        "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
        "down": ("mlp.down_proj",),
    }
    linears: dict[str, Linear] = {}
    for i in range(config.num_layers):
        for fused, names in parts.items():
            tensors = [w(f"model.layers.{i}.{n}.weight") for n in names]
            linears[f"layers.{i}.{fused}"] = DenseLinear(
                tensors[0] if len(tensors) == 1 else torch.cat(tensors)
            )
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    linears[HEAD] = DenseLinear(w(head))
    return linears
