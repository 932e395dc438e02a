"""Roofline step and transfer costs for a GPU and a model shape.

A step takes ``max(FLOPs / (peak × compute_efficiency), bytes / (HBM bandwidth ×
bandwidth_efficiency)) + tensor-parallel all-reduces + step_overhead_s``, where FLOPs are
2 × matmul parameters per token, the LM head per sampled sequence and 4 × layers × q-width per
attended query-key pair, and bytes are the weights once per step plus every KV byte read and
written. A replica holds the model in ``tp`` GPUs (the smallest power of two whose HBM leaves
at least 40 % to the KV cache); the KV pool is the HBM left at ``hbm_utilization``.

Where it is uncertain: the efficiency factors are typical of vLLM-class engines on
these parts (compute 0.5 for prefill-sized batches, HBM 0.7), not measured here; attention
kernels reach less than peak at short contexts; all-reduce time assumes NVLink at
``link_efficiency`` with no overlap; B200 figures are vendor specs for dense BF16.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from pdserve.sim.costs import EngineLimits, Link, StepShape


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_flops: float  # dense BF16 FLOP/s
    hbm_bytes_per_s: float
    hbm_bytes: float
    nvlink_bytes_per_s: float  # per GPU, within a node (tensor-parallel all-reduce)
    network_bytes_per_s: float  # per GPU, between nodes (the prefill → decode KV transfer)
    price_per_hour: float  # USD; the seed article's table, overridable

    compute_efficiency: float = 0.5
    bandwidth_efficiency: float = 0.7
    link_efficiency: float = 0.7
    step_overhead_s: float = 0.002  # scheduling + kernel launches per step
    network_latency_s: float = 0.0005
    hbm_utilization: float = 0.9


GPUS = {
    "H100": Gpu("H100", 989e12, 3.35e12, 80e9, 450e9, 50e9, 2.40),
    "H200": Gpu("H200", 989e12, 4.8e12, 141e9, 450e9, 50e9, 4.54),
    "B200": Gpu("B200", 2250e12, 8.0e12, 192e9, 900e9, 50e9, 7.43),
}


def parse_gpu(spec: str) -> Gpu:
    """``H100``, ``H200``, ``B200``, any of them with a price (``H100=3.10``), or a custom
    part: ``NAME:TFLOPS:HBM_TB_PER_S:HBM_GB:NVLINK_GB_PER_S:NETWORK_GB_PER_S:PRICE``."""
    name, _, price = spec.partition("=")
    if name.upper() in GPUS:
        gpu = GPUS[name.upper()]
        return replace(gpu, price_per_hour=float(price)) if price else gpu
    parts = spec.split(":")
    if len(parts) != 7:
        raise ValueError(
            f"GPU {spec!r}: use H100, H200, B200 (optionally =PRICE) or "
            "NAME:TFLOPS:HBM_TB_PER_S:HBM_GB:NVLINK_GB_PER_S:NETWORK_GB_PER_S:PRICE"
        )
    try:
        tf, hbm_bw, hbm, nvl, net, cost = (float(p) for p in parts[1:])
    except ValueError:
        raise ValueError(f"GPU {spec!r}: the fields after the name must be numbers") from None
    return Gpu(parts[0], tf * 1e12, hbm_bw * 1e12, hbm * 1e9, nvl * 1e9, net * 1e9, cost)


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    dtype_bytes: int = 2

    @property
    def layer_params(self) -> int:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return self.hidden_size * (2 * q + 2 * kv) + 3 * self.hidden_size * self.ffn_size

    @property
    def num_params(self) -> int:
        return self.num_layers * self.layer_params + 2 * self.vocab_size * self.hidden_size

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


MODELS = {
    "smollm2-135m": ModelShape("SmolLM2-135M", 30, 576, 9, 3, 64, 1536, 49152),
    "llama-3-8b": ModelShape("Llama-3-8B", 32, 4096, 32, 8, 128, 14336, 128256),
    "llama-3-70b": ModelShape("Llama-3-70B", 80, 8192, 64, 8, 128, 28672, 128256),
}


def parse_model(spec: str) -> ModelShape:
    """A name from MODELS or ``NAME:LAYERS:HIDDEN:HEADS:KV_HEADS:HEAD_DIM:FFN:VOCAB[:DTYPE_BYTES]``."""
    if spec.lower() in MODELS:
        return MODELS[spec.lower()]
    parts = spec.split(":")
    if len(parts) not in (8, 9) or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(
            f"model {spec!r}: use {', '.join(MODELS)} or "
            "NAME:LAYERS:HIDDEN:HEADS:KV_HEADS:HEAD_DIM:FFN:VOCAB[:DTYPE_BYTES]"
        )
    return ModelShape(parts[0], *(int(p) for p in parts[1:]))


@dataclass(frozen=True)
class RooflineCost:
    gpu: Gpu
    model: ModelShape
    tp: int
    limits: EngineLimits
    dispatch_s: float = 0.0
    worker_overhead_s: float = 0.0  # step_overhead_s is the engine's own (launches, scheduling)
    contention_factor: float = 1.0  # GPUs do not slow each other's steps
    prefill_factor: float = 1.0

    @property
    def name(self) -> str:
        return f"roofline {self.model.name} on {self.tp}x{self.gpu.name}"

    @property
    def gpus_per_replica(self) -> int:
        return self.tp

    @property
    def prefill_tokens_per_s(self) -> float:
        n = self.limits.max_num_batched_tokens
        return n / float(self.step_s(StepShape(n, 1, n * (n + 1) / 2, n)))

    @cached_property
    def _seconds_per_unit(self) -> tuple[float, ...]:
        """The formula's constants, folded once: seconds of compute per token, per sequence
        and per attended pair; seconds of memory for the weights and per KV token; seconds of
        all-reduce per token."""
        m, g = self.model, self.gpu
        flop_s = g.peak_flops * g.compute_efficiency * self.tp
        byte_s = g.hbm_bytes_per_s * g.bandwidth_efficiency * self.tp
        allreduce_per_token = 0.0
        if self.tp > 1:  # two all-reduces of the activations per layer (ring: 2(tp-1)/tp)
            act = 2 * m.num_layers * m.hidden_size * m.dtype_bytes
            allreduce_per_token = (
                act * 2 * (self.tp - 1) / self.tp / (g.nvlink_bytes_per_s * g.link_efficiency)
            )
        return (
            2 * m.num_layers * m.layer_params / flop_s,
            2 * m.vocab_size * m.hidden_size / flop_s,
            4 * m.num_layers * m.num_heads * m.head_dim / flop_s,
            m.num_params * m.dtype_bytes / byte_s,
            m.kv_bytes_per_token / byte_s,
            allreduce_per_token,
        )

    def step_s(self, shape: StepShape):
        token_s, seq_s, pair_s, weights_s, kv_token_s, allreduce_s = self._seconds_per_unit
        n = shape.num_tokens
        compute_s = token_s * n + seq_s * shape.num_seqs + pair_s * shape.attended_pairs
        memory_s = weights_s + kv_token_s * (shape.context_tokens + n)
        # (a step costed alone is plain floats: max() skips numpy's per-call overhead)
        slower_s = (
            max(compute_s, memory_s)
            if isinstance(compute_s, float) and isinstance(memory_s, float)
            else np.maximum(compute_s, memory_s)
        )
        return slower_s + allreduce_s * n + self.gpu.step_overhead_s

    @cached_property
    def _link(self) -> Link:
        m, g = self.model, self.gpu
        return Link(g.network_latency_s, g.network_bytes_per_s * self.tp, m.kv_bytes_per_token,
                    m.num_layers)  # fmt: skip

    def handoff_ready_s(self, prefill_start_s: float, prefill_end_s: float, num_tokens: int):
        return self._link.ready_s(prefill_start_s, prefill_end_s, num_tokens)


def min_tp(gpu: Gpu, model: ModelShape) -> int:
    """The smallest power of two of GPUs whose HBM holds the weights in at most 60 %."""
    tp = 1
    while model.num_params * model.dtype_bytes > 0.6 * gpu.hbm_bytes * tp:
        tp *= 2
        if tp > 64:
            raise ValueError(f"{model.name} does not fit 64 {gpu.name}s")
    return tp


def roofline(
    gpu: Gpu,
    model: ModelShape,
    tp: int | None = None,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 4096,
    block_size: int = 16,
) -> RooflineCost:
    tp = tp or min_tp(gpu, model)
    kv_bytes = gpu.hbm_bytes * tp * gpu.hbm_utilization - model.num_params * model.dtype_bytes
    if kv_bytes <= 0:
        raise ValueError(f"{model.name} does not fit {tp} {gpu.name}(s)")
    num_blocks = int(kv_bytes // (model.kv_bytes_per_token * block_size))
    limits = EngineLimits(num_blocks, block_size, max_num_seqs, max_num_batched_tokens)
    return RooflineCost(gpu, model, tp, limits)
