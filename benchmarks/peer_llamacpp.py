"""llama.cpp (llama-cpp-python) worker for benchmarks/peers.py. Runs in its own venv
(benchmarks/.peers/llamacpp), never the project's; reads the workload (token ids) from a JSON
file and prints one line `PEER_RESULT {json}`.

    benchmarks/.peers/llamacpp/bin/python benchmarks/peer_llamacpp.py WORKLOAD.json

The model is the original Q4_1 GGUF (the workload names its path); prompts are token ids from
pdserve's tokenizer (the GGUF's own vocabulary), so no text is re-tokenized. Greedy sampling;
generation runs for exactly the requested number of tokens (EOS is not a stop here).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    threads = int(spec.get("threads", 2))

    import llama_cpp
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(
        model_path=spec["gguf"],
        n_ctx=int(spec["n_ctx"]),
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        seed=0,
        verbose=False,
    )
    load_s = time.perf_counter() - start

    def generate(prompt: list[int], n: int, keep: list | None = None) -> tuple[float, float]:
        """Seconds to the first token (prefill + sample) and for the n - 1 tokens after it."""
        llm.reset()  # no KV reuse between measurements
        t0 = time.perf_counter()
        first = None
        for count, token in enumerate(llm.generate(prompt, temp=0.0, reset=True), start=1):
            if keep is not None:
                keep.append(int(token))
            if count == 1:
                first = time.perf_counter()
            if count == n:
                break
        end = time.perf_counter()
        return first - t0, end - first

    # Decode at batch 1: 32-token prompt, `new_tokens` generated; best of 2 after a warm-up.
    prompt, new = spec["decode_prompt"], int(spec["decode_new_tokens"])
    greedy: list[int] = []
    generate(prompt, 16, keep=greedy)  # warm-up; its tokens are checked against pdserve's
    decode_s = min(generate(prompt, new)[1] for _ in range(2)) / (new - 1)

    # Many requests with varied prompt/output lengths. llama-cpp-python's Llama object serves
    # one sequence at a time (no batching across requests), so they run one after another.
    prompts, outs = spec["batch_prompts"], spec["batch_outs"]
    generate(prompts[0], 2)
    t0 = time.perf_counter()
    for p, o in zip(prompts, outs, strict=True):
        generate(p, o)
    batch_rate = sum(outs) / (time.perf_counter() - t0)

    # Prefill of the long prompt: one eval (logits of the last token only), best of 2.
    long_prompt = spec["prefill_prompt"]
    llm.reset()
    llm.eval(long_prompt[:64])
    best = float("inf")
    for _ in range(2):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(long_prompt)
        best = min(best, time.perf_counter() - t0)
    prefill_rate = len(long_prompt) / best

    result = {
        "quality": quality(spec, threads) if spec.get("quality_prompts") else None,
        "peer": "llama.cpp",
        "version": f"llama-cpp-python {llama_cpp.__version__}",
        "settings": f"Q4_1 GGUF, n_threads={threads}, n_batch=512, n_ctx={spec['n_ctx']}",
        "startup_s": load_s,
        "decode_step_s": decode_s,
        "decode_tok_s": 1 / decode_s,
        "batch_tok_s": batch_rate,
        "batch_mode": "sequential (one request at a time)",
        "prefill_tok_s": prefill_rate,
        "greedy_tokens": greedy,
    }
    print("PEER_RESULT " + json.dumps(result), flush=True)


def quality(spec: dict, threads: int) -> dict:
    """Greedy tokens for each quality prompt and the summed negative log-likelihood of the
    quality text (every position's logits: a second context with logits_all)."""
    import numpy as np
    from llama_cpp import Llama

    text = spec["quality_text"]
    llm = Llama(
        model_path=spec["gguf"],
        n_ctx=max(512, len(text) + 16),
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        seed=0,
        verbose=False,
    )
    n = int(spec["quality_new_tokens"])
    greedy = []
    for prompt in spec["quality_prompts"]:
        llm.reset()
        tokens = []
        for token in llm.generate(prompt, temp=0.0, reset=True):
            tokens.append(int(token))
            if len(tokens) == n:
                break
        greedy.append(tokens)
    llm.reset()
    llm.eval(text)
    logits = np.asarray(llm.scores[: len(text) - 1], dtype=np.float64)  # [T - 1, vocab]
    top = logits.max(axis=1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    targets = np.asarray(text[1:])
    nll = float((logz - logits[np.arange(len(targets)), targets]).sum())
    return {"greedy": greedy, "nll": nll, "nll_tokens": len(targets)}


if __name__ == "__main__":
    main()
