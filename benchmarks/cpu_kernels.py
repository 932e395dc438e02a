"""The native CPU kernels against the torch paths they replace, on the default model's own
weights and geometry, side by side in one run (what `quant.MAX_QUANTIZED_ROWS`,
`cpu_kernels.MAX_KERNEL_ROWS` and the attention backend's choice rest on).

    .venv/bin/python benchmarks/cpu_kernels.py [--threads 2]

1. Every projection of every layer once (a decode step's products), at each row count:
   PyTorch's int4 kernel (up to 8 rows; it re-reads the weights per row), pdserve's native
   kernel on the GGUF blocks, the dense bf16 copy (oneDNN), and, for reference, the same
   weights in fp32 with fp32 inputs (the exact path's product; without native bf16, as on an
   AVX2-only CPU, the fastest dense form).
2. Decode attention for a batch of sequences over the paged pool: the native kernel reading
   blocks in place against gathering each context and running SDPA (what the engine did before).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from machine_info import cpu_model

from pdserve import cpu_kernels
from pdserve.engine.attention import AttentionMetadata, SdpaBackend
from pdserve.model.loader import load_checkpoint, load_quantized
from pdserve.model.quant import INT4_GROUP_SIZE, Int4Linear

ROWS = (1, 4, 8, 9, 12, 16, 32, 64, 128, 256, 512)
TORCH_INT4_MAX_ROWS = 16


ROUNDS = 7


def best_ms(*fns) -> list[float]:
    """The best time of each function over ROUNDS rounds, the functions taking turns within a
    round, so that a slow spell of the machine (other processes, clock changes) hits all of
    them alike instead of whichever ran during it."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(ROUNDS):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return [t * 1e3 for t in best]


def products_table(linears: list[Int4Linear], native) -> list[str]:
    fp32_weights = [lin.dense.float() for lin in linears]
    lines = [
        "| rows | torch int4 (ms) | native (ms) | dense bf16 (ms) | native ÷ best torch "
        "| dense fp32 (ms) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for rows in ROWS:
        inputs = {
            w: torch.randn(rows, w).bfloat16() for w in {lin.dense.shape[1] for lin in linears}
        }
        inputs32 = {w: x.float() for w, x in inputs.items()}

        def torch_int4(inputs=inputs):
            for lin in linears:
                x = inputs[lin.dense.shape[1]]
                torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x, lin.packed, INT4_GROUP_SIZE, lin.scales_and_zeros
                )

        def native_int4(inputs=inputs):
            for lin in linears:
                b = lin.blocks
                native.int4_linear(inputs[lin.dense.shape[1]], b.qs, b.scales, b.mins)

        def dense(inputs=inputs):
            for lin in linears:
                F.linear(inputs[lin.dense.shape[1]], lin.dense)

        def dense_fp32(inputs=inputs32):
            for lin, weight in zip(linears, fp32_weights, strict=True):
                F.linear(inputs[lin.dense.shape[1]], weight)

        if rows <= TORCH_INT4_MAX_ROWS:
            t_int4, t_native, t_dense, t_fp32 = best_ms(torch_int4, native_int4, dense, dense_fp32)
        else:
            t_int4 = float("nan")
            t_native, t_dense, t_fp32 = best_ms(native_int4, dense, dense_fp32)
        best_torch = min(t for t in (t_int4, t_dense) if t == t)
        lines.append(
            f"| {rows} | {t_int4:.1f} | {t_native:.1f} | {t_dense:.1f} | "
            f"{t_native / best_torch:.2f} | {t_fp32:.1f} |"
        )
    return lines


def attention_table(native, heads: int, kv_heads: int, head_dim: int, block_size: int):
    lines = [
        "| sequences × context | gather + SDPA (ms) | native paged (ms) | speed-up |",
        "|---|---:|---:|---:|",
    ]
    gathering, paged = SdpaBackend(None), SdpaBackend(native)
    for batch, context in ((1, 256), (8, 512), (32, 256), (32, 1024)):
        blocks_per_seq = -(-context // block_size)
        num_blocks = batch * blocks_per_seq + 1
        k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).bfloat16()
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(num_blocks)[: batch * blocks_per_seq].view(batch, -1)
        lens = torch.full((batch,), context)
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(0, dtype=torch.int64),
            prefills=[],
            decode_token_index=torch.arange(batch),
            decode_block_tables=tables,
            decode_context_lens=lens,
            decode_mask=None,
            decode_max_len=context,
        )
        q = torch.randn(batch, heads, head_dim).bfloat16()
        scale = head_dim**-0.5
        args = (q, k_cache, v_cache, meta, scale)
        t_gather, t_native = best_ms(
            lambda args=args: gathering.decode_paged(*args),
            lambda args=args: paged.decode_paged(*args),
        )
        lines.append(
            f"| {batch} × {context} | {t_gather:.2f} | {t_native:.2f} | "
            f"{t_gather / t_native:.1f}× |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native = cpu_kernels.kernels()
    if native is None:
        raise SystemExit("no native kernels on this machine (see the log); nothing to compare")
    checkpoint = load_checkpoint(None)
    linears = [
        lin
        for name, lin in load_quantized(checkpoint, "int4").items()
        if isinstance(lin, Int4Linear)
    ]
    cfg = checkpoint.config
    print(
        f"{cpu_model()}, {args.threads} threads, native build {native.isa}; "
        f"1-min load average {os.getloadavg()[0]:.1f}"
    )
    print(f"\n{len(linears)} int4 projections of {cfg.name} (one decode step's products):\n")
    print("\n".join(products_table(linears, native)))
    print(
        f"\ndecode attention, {cfg.num_heads} heads / {cfg.num_kv_heads} KV heads × {cfg.head_dim}:\n"
    )
    print("\n".join(attention_table(native, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 16)))


if __name__ == "__main__":
    main()
