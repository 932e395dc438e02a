"""Where a batch-1 decode step's time goes: the step, its matrix products alone, and the
torch profiler's top operators, for one precision on this machine.

    .venv/bin/python benchmarks/decode_profile.py [--quantization auto] [--threads 2]

The matrix products are replayed with the step's own shapes and weights (every projection of
every layer and the output projection, one row each), so step ÷ products is the engine's
overhead outside them (issue 10's target: at most 1.10).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from machine_info import cpu_model
from torch.profiler import ProfilerActivity, profile

from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams


def step_times_s(engine: LLMEngine, num_steps: int) -> list[float]:
    engine.add_request(list(range(100, 132)), SamplingParams(max_tokens=10**6, ignore_eos=True))
    for _ in range(20):  # warm-up
        engine.step()
    times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def products_s(engine: LLMEngine, repeat: int = 20) -> float:
    """One decode step's matrix products alone, at batch 1."""
    model = engine.runner.model
    hidden = engine.model_config.hidden_size
    x = torch.randn(1, hidden, dtype=model.dtype)
    inputs = {
        "qkv": x,
        "o": torch.randn(1, engine.model_config.num_heads * engine.model_config.head_dim,
                         dtype=model.dtype),
        "gate_up": x,
        "down": torch.randn(1, engine.model_config.intermediate_size, dtype=model.dtype),
    }  # fmt: skip

    def run() -> None:
        for layer in model.layers:
            for name, inp in inputs.items():
                layer[name](inp)
        model.lm_head(x)

    for _ in range(5):
        run()
    start = time.perf_counter()
    for _ in range(repeat):
        run()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(quantization=args.quantization, enable_prefix_caching=False,
                                    num_threads=args.threads))  # fmt: skip
    times = step_times_s(engine, args.steps)
    step_s = statistics.median(times)
    mm_s = products_s(engine)
    print(f"{cpu_model()}, {args.threads} threads, {engine.quantization} ({engine.dtype}); "
          f"1-min load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"decode step, batch 1: median {step_s * 1e3:.2f} ms, min {min(times) * 1e3:.2f} ms "
          f"({1 / step_s:.1f} tok/s)")  # fmt: skip
    print(f"its matrix products alone: {mm_s * 1e3:.2f} ms; step / products = {step_s / mm_s:.2f}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
