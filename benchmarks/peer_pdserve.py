"""pdserve's worker for benchmarks/peers.py: the same workload file and the same one-line
`PEER_RESULT {json}` as the peer workers, run with the project's own venv.

    .venv/bin/python benchmarks/peer_pdserve.py WORKLOAD.json

Performance (decode at batch 1, the varied requests, the long prefill, load time) is measured
for each precision in `spec["pdserve_modes"]`; quality (greedy tokens over the quality prompts,
negative log-likelihood of the quality text) for each mode in `spec["quality_modes"]`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from pdserve.engine.attention import AttentionMetadata, PrefillSegment
from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.model.loader import load_checkpoint, load_model
from pdserve.model.quant import MAX_QUANTIZED_ROWS, resolve_quantization

# Rows of logits computed at once for the perplexity (a [rows, vocab] fp32 block each).
_LOGIT_ROWS = 256
# Decode rows for the second quality pass: past PyTorch's few-row kernels (MAX_QUANTIZED_ROWS).
BATCHED_QUALITY_ROWS = 16


def engine_for(checkpoint, mode: str, threads: int) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            quantization=mode,
            max_num_batched_tokens=2048,
            enable_prefix_caching=False,
            num_threads=threads,
        ),
        checkpoint=checkpoint,
    )


def load_seconds(mode: str) -> dict[str, float]:
    """What an engine in `mode` loads (`load_model`), with an empty cache (GGUF parse,
    dequantize, pack) and again with the cache just written."""
    resolved = resolve_quantization(mode, torch.device("cpu"))
    times = []
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(2):
            start = time.perf_counter()
            load_model(None, torch.float32, resolved, cache_dir=Path(cache))
            times.append(time.perf_counter() - start)
    return {"load_first_s": times[0], "load_cached_s": times[1]}


def decode_step_s(engine: LLMEngine, prompt: list[int], new_tokens: int) -> float:
    engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    best = float("inf")
    for _ in range(2):
        engine.add_request(
            prompt, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        )
        engine.step()  # prefill + first token
        start = time.perf_counter()
        steps = 0
        while engine.has_unfinished:
            engine.step()
            steps += 1
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def batch_tok_s(engine: LLMEngine, prompts, outs) -> float:
    params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in outs]
    engine.generate(prompts[:2], [SamplingParams(max_tokens=2, temperature=0)] * 2)
    start = time.perf_counter()
    engine.generate(prompts, params)
    return sum(outs) / (time.perf_counter() - start)


def prefill_tok_s(engine: LLMEngine, prompt: list[int]) -> float:
    params = SamplingParams(max_tokens=1, temperature=0)
    engine.generate([prompt[:64]], params)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        engine.generate([prompt], params)
        best = min(best, time.perf_counter() - start)
    return len(prompt) / best


def weight_bytes_per_token(engine: LLMEngine) -> int:
    """Bytes of weights one batch-1 decode step reads: every projection once, one embedding row."""
    model = engine.runner.model
    per_layer = sum(tensor.nbytes for layer in model.layers for tensor in layer.values())
    row = engine.model_config.hidden_size * torch.empty((), dtype=model.dtype).element_size()
    return per_layer + model.lm_head.nbytes + row


@torch.inference_mode()
def sequence_nll(engine: LLMEngine, token_ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of tokens 1.. given their prefixes (one causal prefill over
    the engine's pool, blocks 0.. in order), and the number of predicted tokens."""
    runner = engine.runner
    num_tokens = len(token_ids)
    num_blocks = -(-num_tokens // runner.block_size)
    ids = torch.tensor(token_ids)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(num_tokens),
        prefills=[PrefillSegment(0, num_tokens, num_tokens, torch.arange(num_blocks))],
        decode_token_index=torch.zeros(0, dtype=torch.int64),
        decode_block_tables=torch.zeros(0, 0, dtype=torch.int64),
        decode_context_lens=torch.zeros(0, dtype=torch.int64),
        decode_mask=None,
    )
    hidden = runner.model.forward(ids, torch.arange(num_tokens), runner.kv_pool, meta)
    total = 0.0
    for start in range(0, num_tokens - 1, _LOGIT_ROWS):
        rows = slice(start, min(start + _LOGIT_ROWS, num_tokens - 1))
        logprobs = runner.model.compute_logits(hidden[rows]).log_softmax(-1)
        targets = ids[rows.start + 1 : rows.stop + 1]
        total -= logprobs.gather(1, targets[:, None]).sum().item()
    return total, num_tokens - 1


def quality(engine: LLMEngine, spec: dict) -> dict:
    """Greedy tokens in batches of MAX_QUANTIZED_ROWS, so that every decode step of a quantized
    mode runs PyTorch's few-row kernel, and for a quantized mode again in batches of
    BATCHED_QUALITY_ROWS, which run the native kernel (pdserve.cpu_kernels) where it loads and
    the dense bf16 copy elsewhere. One batch of all prompts would measure only the latter (it
    made int8 and int4 score alike to the last digit)."""
    n = int(spec["quality_new_tokens"])
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    prompts = spec["quality_prompts"]

    def greedy(rows: int) -> list[list[int]]:
        done = []
        for start in range(0, len(prompts), rows):
            done += engine.generate(prompts[start : start + rows], params)
        return [list(c.token_ids) for c in done]

    nll, count = sequence_nll(engine, spec["quality_text"])
    result = {"greedy": greedy(MAX_QUANTIZED_ROWS), "nll": nll, "nll_tokens": count}
    if engine.quantization != "none":
        result["batched_rows"] = BATCHED_QUALITY_ROWS
        result["greedy_batched"] = greedy(BATCHED_QUALITY_ROWS)
    return result


def performance(engine: LLMEngine, spec: dict) -> dict:
    step_s = decode_step_s(engine, spec["decode_prompt"], int(spec["decode_new_tokens"]))
    nbytes = weight_bytes_per_token(engine)
    return {
        "decode_step_s": step_s,
        "decode_tok_s": 1 / step_s,
        "decode_gb_s": nbytes / step_s / 1e9,
        "weight_bytes": nbytes,
        "batch_tok_s": batch_tok_s(engine, spec["batch_prompts"], spec["batch_outs"]),
        "prefill_tok_s": prefill_tok_s(engine, spec["prefill_prompt"]),
    }


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    threads = int(spec.get("threads", 2))
    torch.set_num_threads(threads)
    checkpoint = load_checkpoint(None)
    modes = list(dict.fromkeys(spec.get("pdserve_modes", []) + spec.get("quality_modes", [])))
    result: dict = {
        "peer": "pdserve",
        "version": f"pdserve, torch {torch.__version__}",
        "modes": {},
    }
    for mode in modes:
        start = time.perf_counter()
        engine = engine_for(checkpoint, mode, threads)
        entry: dict = {
            "resolved": engine.quantization,
            "dtype": str(engine.dtype).removeprefix("torch."),
        }
        entry["startup_s"] = time.perf_counter() - start
        if mode in spec.get("pdserve_modes", []):
            entry.update(performance(engine, spec))
            entry.update(load_seconds(mode))
        if mode in spec.get("quality_modes", []):
            entry["quality"] = quality(engine, spec)
        result["modes"][mode] = entry
        del engine
    print("PEER_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
