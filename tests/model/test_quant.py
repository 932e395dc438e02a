"""Quantized projections: GGUF 4-bit blocks run as they are, int8 rows, the mode each CPU gets,
and the packed-weights cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_tiny_gguf
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from pdserve import cpu_kernels
from pdserve.model import loader, quant
from pdserve.model.loader import load_checkpoint, load_model, load_quantized
from pdserve.model.quant import (
    HEAD,
    Int4Linear,
    Int8Linear,
    compute_dtype,
    linear_names,
    resolve_quantization,
    variant_fingerprint,
)
from pdserve.model.safetensors_dir import is_projection

CPU = torch.device("cpu")


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_4bit_blocks_map_exactly_onto_scale_and_zero(qtype):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((32, 96)).astype(np.float32)
    blocks = quantize(values, qtype)
    q, scales, zeros = quant._int4_from_blocks(blocks.reshape(-1), qtype, values.shape)
    rebuilt = (q.astype(np.float32).reshape(32, 3, 32) - 8) * scales[..., None] + zeros[..., None]
    np.testing.assert_allclose(rebuilt.reshape(32, 96), dequantize(blocks, qtype), atol=1e-5)


def test_int4_linear_runs_the_file_weights():
    rng = np.random.default_rng(1)
    values = rng.standard_normal((48, 64)).astype(np.float32)
    blocks = quantize(values, GGMLQuantizationType.Q4_1)
    parts = quant._int4_from_blocks(blocks.reshape(-1), GGMLQuantizationType.Q4_1, values.shape)
    linear = Int4Linear.from_parts(*parts)
    x = torch.from_numpy(rng.standard_normal((3, 64)).astype(np.float32))
    expected = x @ torch.from_numpy(dequantize(blocks, GGMLQuantizationType.Q4_1)).T
    got = linear(x.bfloat16()).float()
    # bf16 activations, scales and zeros: ~3 significant digits
    assert (got - expected).norm() / expected.norm() < 1e-2


def test_int8_linear_rounds_each_row_to_its_scale():
    w = torch.randn(32, 64)
    linear = Int8Linear.quantize(w)
    dequantized = linear.qweight.float() * linear.scales.float()[:, None]
    assert torch.all((dequantized - w).abs() <= linear.scales.float()[:, None] * 0.51)
    ids = torch.tensor([3, 0, 31])
    torch.testing.assert_close(linear.rows(ids, torch.float32), w.bfloat16().float()[ids])
    x = torch.randn(2, 64).bfloat16()
    torch.testing.assert_close(linear(x).float(), x.float() @ dequantized.T, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dense", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", [Int4Linear, Int8Linear])
@pytest.mark.parametrize("rows", [quant.MAX_QUANTIZED_ROWS + 4, cpu_kernels.MAX_KERNEL_ROWS + 3])
def test_every_row_count_computes_the_same_product(kind, rows, dense, monkeypatch):
    """Few rows run PyTorch's kernel, more the native kernel (where it loads), more still the
    dense copy (bf16, or fp32 where bf16 is not native): one product whichever runs."""
    monkeypatch.setattr(quant, "dense_dtype", lambda: dense)
    w = torch.randn(32, 64)
    linear = kind.quantize(w.numpy() if kind is Int4Linear else w)
    x = torch.randn(rows, 64).bfloat16()
    many = linear(x)
    few = torch.cat([linear(x[i : i + 1]) for i in range(x.shape[0])]).float()
    assert linear.dense.dtype is dense and many.dtype is torch.bfloat16
    assert (many.float() - few).norm() / few.norm() < 2e-2


@pytest.mark.parametrize(
    ("flags", "capability", "dense"),
    [
        ({"avx512f", "avx512_bf16"}, "AVX512", torch.bfloat16),
        ({"avx512f", "avx512_bf16"}, "AVX2", torch.float32),  # PyTorch held to its AVX2 code
        ({"avx2", "fma"}, "AVX2", torch.float32),
    ],
)
def test_dense_copies_are_bf16_only_where_bf16_is_native(monkeypatch, flags, capability, dense):
    monkeypatch.setattr(quant, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert quant.dense_dtype() is dense


def test_rows_past_the_few_row_kernel_run_the_native_kernel(monkeypatch):
    if cpu_kernels.kernels() is None:
        pytest.skip("no native kernels on this machine")
    linear = Int4Linear.quantize(np.random.default_rng(2).standard_normal((32, 64), np.float32))
    calls = []
    native = linear._native
    wrapped = native.int4_linear
    monkeypatch.setattr(native, "int4_linear", lambda *a: calls.append(1) or wrapped(*a))
    linear(torch.randn(quant.MAX_QUANTIZED_ROWS, 64).bfloat16())
    linear(torch.randn(native.max_product_rows + 1, 64).bfloat16())
    assert calls == []
    linear(torch.randn(quant.MAX_QUANTIZED_ROWS + 1, 64).bfloat16())
    assert calls == [1]


def test_int4_rejects_shapes_the_kernel_cannot_pack():
    with pytest.raises(ValueError, match="out % 16"):
        Int4Linear.quantize(np.zeros((24, 64), dtype=np.float32))


@pytest.mark.parametrize(
    ("requested", "flags", "device", "mode"),
    [
        ("auto", {"avx512f", "avx512_bf16"}, "cpu", "int4"),
        ("auto", {"avx2", "amx_bf16"}, "cpu", "int4"),
        ("auto", {"avx2", "fma"}, "cpu", "int4"),
        ("auto", {"sse4_2"}, "cpu", "none"),
        ("auto", {"avx512_bf16"}, "cuda", "none"),
        ("int8", {"avx2"}, "cpu", "int8"),
        ("none", {"avx512_bf16"}, "cpu", "none"),
    ],
)
def test_mode_follows_the_cpu(requested, flags, device, mode):
    assert resolve_quantization(requested, torch.device(device), frozenset(flags)) == mode


def test_quantized_modes_refuse_a_gpu_and_unknown_names():
    with pytest.raises(ValueError, match="CPU only"):
        resolve_quantization("int4", torch.device("cuda"), frozenset())
    with pytest.raises(ValueError, match="quantization must be one of"):
        resolve_quantization("int3", CPU, frozenset())


def test_quantized_modes_compute_in_bf16_and_have_their_own_fingerprint():
    assert compute_dtype("none", torch.float32) is torch.float32
    assert compute_dtype("int4", torch.float32) is torch.bfloat16
    prints = {variant_fingerprint("ab" * 16, m) for m in ("none", "int8", "int4")}
    assert len(prints) == 3 and "ab" * 16 in prints


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_gguf_projections_match_dequantized_weights(tmp_path, mode):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    checkpoint = load_checkpoint(tiny.path, cache_dir=tmp_path / "cache")
    linears = load_quantized(checkpoint, mode, cache_dir=tmp_path / "cache")
    assert sorted(linears) == sorted(linear_names(checkpoint.config))
    assert isinstance(linears[HEAD], Int8Linear)  # the Q8_0 tied embedding stays 8-bit
    expected_kind = Int4Linear if mode == "int4" else Int8Linear
    assert isinstance(linears["layers.1.qkv"], expected_kind)
    parts = [f"model.layers.1.self_attn.{n}_proj.weight" for n in "qkv"]
    weight = torch.from_numpy(np.concatenate([tiny.expected[p] for p in parts]))
    x = torch.randn(4, weight.shape[1])
    expected = x @ weight.T
    got = linears["layers.1.qkv"](x.bfloat16()).float()
    assert (got - expected).norm() / expected.norm() < 2e-2  # Q/K rows un-permuted like HF


def test_packed_projections_are_cached(tmp_path, monkeypatch):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    checkpoint = load_checkpoint(tiny.path, cache_dir=cache)
    first = load_quantized(checkpoint, "int4", cache_dir=cache)

    def fail(*args):
        raise AssertionError("packed again instead of read from the cache")

    monkeypatch.setattr(quant, "quantize_gguf", fail)
    again = load_quantized(checkpoint, "int4", cache_dir=cache)
    for rows in (2, quant.MAX_QUANTIZED_ROWS + 4):  # PyTorch's kernel, then the native one
        x = torch.randn(rows, 64).bfloat16()
        for name in ("layers.0.gate_up", HEAD):
            torch.testing.assert_close(again[name](x), first[name](x), rtol=0, atol=0)


def test_a_quantized_model_loads_without_float_projections(tmp_path, monkeypatch):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    full = load_checkpoint(tiny.path, cache_dir=cache)
    checkpoint, linears = load_model(tiny.path, torch.float32, "int4", cache_dir=cache)
    assert not checkpoint.projections and checkpoint.fingerprint == full.fingerprint
    assert set(checkpoint.weights) == {n for n in full.weights if not is_projection(n)}
    assert "model.embed_tokens.weight" in checkpoint.weights
    for name in checkpoint.weights:
        assert torch.equal(checkpoint.weights[name], full.weights[name]), name
    assert sorted(linears) == sorted(linear_names(full.config))

    def fail(*args, **kwargs):
        raise AssertionError("dequantized again instead of read from the cache")

    monkeypatch.setattr(loader, "llama_weights_from_gguf", fail)
    again, _ = load_model(tiny.path, torch.float32, "int4", cache_dir=cache)
    assert set(again.weights) == set(checkpoint.weights) and not again.projections


def test_the_exact_path_refuses_a_checkpoint_without_projections(tmp_path):
    from pdserve.engine.engine_config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine

    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    checkpoint, _ = load_model(tiny.path, torch.float32, "int4", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="projections"):
        LLMEngine(EngineConfig(model=str(tiny.path), quantization="none"), checkpoint)
