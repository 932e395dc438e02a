"""The quantized engine paths on the default model: bf16 compute and KV, a fingerprint of their
own, and greedy tokens that track the exact path (a floor, not equality)."""

import pytest
import torch
from conftest import PASSAGES

from pdserve.engine.attention import AttentionMetadata, PrefillSegment
from pdserve.engine.sampling_params import SamplingParams
from pdserve.model import quant
from pdserve.model.llama import NativeLayerOps, RotaryEmbedding, TorchLayerOps

pytestmark = pytest.mark.timeout(900)

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


@pytest.fixture(scope="module")
def exact_tokens(engine, checkpoint):
    prompts = [checkpoint.tokenizer.encode(p) for p in PASSAGES]
    return prompts, [c.token_ids for c in engine.generate(prompts, GREEDY)]


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantized_engine_tracks_the_exact_path(make_engine, engine, exact_tokens, mode):
    quantized = make_engine(quantization=mode, max_num_batched_tokens=256)
    assert quantized.quantization == mode
    assert quantized.dtype is torch.bfloat16 and quantized.runner.kv_pool.dtype is torch.bfloat16
    assert quantized.fingerprint != engine.fingerprint  # its KV blocks are never shared
    prompts, expected = exact_tokens
    got = [c.token_ids for c in quantized.generate(prompts, GREEDY)]
    agreement = [agreeing_prefix(g, e) for g, e in zip(got, expected, strict=True)]
    # Measured: int4 and int8 agree on all 16 tokens for most passages (benchmarks/quality.py
    # measures 64 tokens over 50 prompts); a broken layout agrees on none.
    assert sum(agreement) / len(agreement) >= 8, agreement


def prompt_logits(engine, token_ids: list[int]) -> torch.Tensor:
    """Logits after a prompt, from one causal prefill over the engine's pool."""
    runner, n = engine.runner, len(token_ids)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n),
        prefills=[PrefillSegment(0, n, n, torch.arange(-(-n // runner.block_size)))],
        decode_token_index=torch.zeros(0, dtype=torch.int64),
        decode_block_tables=torch.zeros(0, 0, dtype=torch.int64),
        decode_context_lens=torch.zeros(0, dtype=torch.int64),
        decode_mask=None,
    )
    hidden = runner.model.forward(torch.tensor(token_ids), torch.arange(n), runner.kv_pool, meta)
    return runner.model.compute_logits(hidden[-1:])[0]


def test_native_layer_ops_stay_within_the_bf16_paths_own_error(make_engine, engine, checkpoint):
    """The bf16 path's norms, rotary embedding and SwiGLU in native calls (where the CPU kernels
    load) against the same model with torch ops: their logits differ by less than the torch-op
    bf16 model differs from the exact fp32 one (a wrong rotation or gate would differ by far
    more)."""
    quantized = make_engine(quantization="int4", max_num_batched_tokens=256)
    model = quantized.runner.model
    if not isinstance(model.ops, NativeLayerOps):
        pytest.skip("no native kernels on this machine")
    native_ops = model.ops
    torch_ops = TorchLayerOps(
        model.config, RotaryEmbedding(model.config, model.device), model.dtype
    )
    for passage in PASSAGES:
        ids = checkpoint.tokenizer.encode(passage)
        exact = prompt_logits(engine, ids)
        model.ops = torch_ops
        with_torch_ops = prompt_logits(quantized, ids)
        model.ops = native_ops
        with_native_ops = prompt_logits(quantized, ids)
        native_error = (with_native_ops - with_torch_ops).abs().max()
        assert native_error < (with_torch_ops - exact).abs().max(), passage
        assert with_native_ops.argmax() == with_torch_ops.argmax()


def _decode_plan(engine, num_requests: int):
    """Prefill `num_requests` prompts of varied lengths, then schedule (without running) the
    pure-decode step that follows: its prepared inputs."""
    for i in range(num_requests):
        prompt = [100 + (7 * i + j) % 900 for j in range(3 + (11 * i) % 40)]
        engine.add_request(prompt, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    while engine.scheduler.num_pending_prompt_tokens:
        engine.step()
    input_ids, positions, meta, _, _ = engine.runner.prepare(engine.scheduler.schedule(None))
    assert not meta.prefills and input_ids.shape[0] == num_requests
    return input_ids, positions, meta


# 1: PyTorch's int4 kernel; 12: the native 4-bit product; 130: the dense copy, in bf16 or (as
# on a CPU without native bf16) fp32.
@pytest.mark.parametrize(
    ("batch", "dense"),
    [(1, torch.bfloat16), (12, torch.bfloat16), (130, torch.bfloat16), (130, torch.float32)],
)
def test_decode_stack_is_bit_identical_to_the_layer_loop(make_engine, monkeypatch, batch, dense):
    monkeypatch.setattr(quant, "dense_dtype", lambda: dense)
    quantized = make_engine(quantization="int4", max_num_seqs=256)
    assert quantized.runner.model.layers[0]["down"].dense.dtype is dense
    model = quantized.runner.model
    if not model.has_decode_stack:
        pytest.skip("no native decode stack on this machine (no CPU kernels or no bf16)")
    input_ids, positions, meta = _decode_plan(quantized, batch)
    pool = quantized.runner.kv_pool
    stacked = model.forward(input_ids, positions, pool, meta)
    monkeypatch.setattr(model, "_decode_stack", None)
    looped = model.forward(input_ids, positions, pool, meta)
    assert torch.equal(stacked, looped)


def test_decode_stack_reports_every_layer_done(make_engine):
    quantized = make_engine(quantization="int4")
    model = quantized.runner.model
    if not model.has_decode_stack:
        pytest.skip("no native decode stack on this machine (no CPU kernels or no bf16)")
    input_ids, positions, meta = _decode_plan(quantized, 2)
    done: list[int] = []
    model.forward(input_ids, positions, quantized.runner.kv_pool, meta, done.append)
    assert done == list(range(model.config.num_layers))
