"""int8 KV compression on the wire: greedy agreement with the exact handoff, bytes saved, and
what the encoding does to a gRPC Get, side by side in one run.

    python benchmarks/kv_compression.py [--prompts 20] [--new-tokens 32] [--modes none auto]

Agreement. Per weight mode (``none``: fp32 weights and KV, the exact path; ``auto``: the
default, int4 weights with a bf16 KV cache on a CPU with native bf16), two engines on the same
checkpoint. Each prompt is a topic opener plus ``--context-tokens`` greedy tokens of the model
itself (natural text, several full blocks). The reference engine continues it greedily; it
equals the uncompressed disaggregated path token for token (tests/serving). The other engine
receives the prompt's full blocks exported from the reference, int8-encoded and decoded
(pdserve.kv.compression), imports them as a decode worker does, and continues from them.
Reported: prompts whose ``--new-tokens`` all agree, and the mean share of tokens before the
first divergence.

Wire. A kvstore subprocess on loopback per block geometry (the default model's, and a
Llama-3-8B bf16 2 MiB block), blocks of random normal values; the median rate of a plain and
an int8 Get of the same blocks, in raw bytes delivered per second, and the bytes each sends.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from kv_transfer import start_kvstore, start_redis
from machine_info import cpu_model
from peers import QUALITY_TOPICS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pdserve.engine.engine_config import EngineConfig  # noqa: E402
from pdserve.engine.llm_engine import LLMEngine  # noqa: E402
from pdserve.engine.sampling_params import SamplingParams  # noqa: E402
from pdserve.kv.blocks import BlockKey  # noqa: E402
from pdserve.kv.compression import KVGeometry, decode_int8, encode_int8  # noqa: E402
from pdserve.kv.grpc_transport import GrpcTransport  # noqa: E402
from pdserve.kv.malloc import keep_large_buffers  # noqa: E402

GB = 1e9


def geometry_of(engine: LLMEngine) -> KVGeometry:
    m = engine.model_config
    dtype = str(engine.dtype).removeprefix("torch.")
    return KVGeometry(m.num_layers, engine.config.block_size, m.num_kv_heads, m.head_dim, dtype)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def agreement(mode: str, args) -> dict:
    """Greedy continuations from exact blocks vs from int8-decoded ones, for one weight mode."""
    config = EngineConfig(quantization=mode, kv_cache_bytes=256 << 20, num_threads=args.threads)
    reference = LLMEngine(config)
    receiver = LLMEngine(config, checkpoint=reference.checkpoint)
    geometry = geometry_of(reference)
    tokenizer, bs = reference.tokenizer, config.block_size
    all_agree, shares = 0, []
    for topic in QUALITY_TOPICS[: args.prompts]:
        opener = tokenizer.encode(f"The story of {topic} begins")
        [context] = reference.generate([opener], greedy(args.context_tokens))
        prompt = opener + context.token_ids
        [expected] = reference.generate([prompt], greedy(args.new_tokens))
        keys = reference.block_keys(prompt[: (len(prompt) - 1) // bs * bs])
        payloads = [
            decode_int8(encode_int8(b, geometry), geometry) for b in reference.export_blocks(keys)
        ]
        receiver.import_blocks(prompt, keys, payloads)
        [got] = receiver.generate([prompt], greedy(args.new_tokens))
        assert got.num_cached_tokens == len(keys) * bs, "the imported blocks were not used"
        same = next(
            (
                i
                for i, (a, b) in enumerate(zip(got.token_ids, expected.token_ids, strict=True))
                if a != b
            ),
            args.new_tokens,
        )
        all_agree += same == args.new_tokens
        shares.append(same / args.new_tokens)
    return {
        "mode": mode, "dtype": geometry.dtype, "prompts": len(shares), "all_agree": all_agree,
        "mean_share": statistics.mean(shares), "geometry": geometry,
        "prompt_tokens": len(prompt),
    }  # fmt: skip


def wire(
    redis_url: str, workdir: Path, geometry: KVGeometry, total_bytes: int, repeats: int
) -> dict:
    """Median plain and int8 Get rates of the same blocks (raw bytes delivered per second)."""
    n = max(4, total_bytes // geometry.block_nbytes)
    rng = np.random.default_rng(5)
    itemsize = 4 if geometry.dtype == "float32" else 2
    values = rng.standard_normal((n, geometry.block_nbytes // itemsize), dtype=np.float32)
    if geometry.dtype == "bfloat16":  # the top half of an fp32 is its bf16
        values = (values.view(np.uint32) >> 16).astype(np.uint16)
    elif geometry.dtype == "float16":
        values = values.astype(np.float16)
    blocks = [v.tobytes() for v in values]
    keys = [BlockKey(random.Random(i).randbytes(16)) for i in range(n)]
    proc, address = start_kvstore(redis_url, geometry.block_nbytes, n + 8, workdir)
    try:
        plain, packed = GrpcTransport(address), GrpcTransport(address, int8_geometry=geometry)
        plain.put_blocks(list(zip(keys, blocks, strict=True)))
        rates = {}
        for name, transport in (("plain", plain), ("int8", packed)):
            transport.get_blocks(keys)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                got = transport.get_blocks(keys)
                times.append(time.perf_counter() - start)
            assert all(g is not None for g in got)
            rates[name] = n * geometry.block_nbytes / statistics.median(times)
        plain.close()
        packed.close()
    finally:
        proc.terminate()
        proc.wait(30)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--context-tokens", type=int, default=160)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--modes",
        nargs="*",
        default=["none", "auto"],
        help="weight modes for the agreement runs; none given: only the wire figures",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--total-mib", type=int, default=128, help="bytes per wire measurement")
    args = parser.parse_args()
    keep_large_buffers()
    print(f"# kv_compression  machine: {cpu_model()}, {os.cpu_count()} cores")
    print(f"load average (1 min) at the start: {os.getloadavg()[0]:.1f}")
    for mode in args.modes:
        r = agreement(mode, args)
        g = r["geometry"]
        print(
            f"weights {mode}, KV {r['dtype']}: {r['all_agree']}/{r['prompts']} prompts agree on all "
            f"{args.new_tokens} greedy tokens, {100 * r['mean_share']:.1f}% of tokens before the "
            f"first divergence (prompts of ~{r['prompt_tokens']} tokens from int8 blocks); block "
            f"{g.block_nbytes:,} B -> {g.int8_nbytes:,} B on the wire "
            f"({100 * (1 - g.int8_nbytes / g.block_nbytes):.0f}% saved)"
        )
    workdir = Path(tempfile.mkdtemp(prefix="pdserve-bench-"))
    redis_proc, redis_url = start_redis(workdir)
    try:
        for name, geometry in (
            ("SmolLM2-135M fp32", KVGeometry(30, 16, 3, 64, "float32")),
            ("Llama-3-8B bf16", KVGeometry(32, 16, 8, 128, "bfloat16")),
        ):
            rates = wire(redis_url, workdir, geometry, args.total_mib << 20, 5)
            print(
                f"gRPC Get, {name} {geometry.block_nbytes:,} B blocks: plain "
                f"{rates['plain'] / GB:.2f} GB/s, int8 {rates['int8'] / GB:.2f} GB/s of decoded "
                f"blocks ({geometry.int8_nbytes:,} B each on the wire)"
            )
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
