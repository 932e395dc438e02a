"""The native CPU kernels against plain torch arithmetic, for every build this CPU can run, and
the ways they are chosen or refused."""

from __future__ import annotations

import ctypes

import pytest
import torch

from pdserve import cpu_kernels
from pdserve.cpu_kernels import Kernels, build, cpu_flags, isas_for

RUNNABLE = isas_for(cpu_flags())


def _load(isa: str) -> Kernels:
    library = ctypes.CDLL(str(build(isa)))
    if isa == "amx" and library.pdk_request_amx() != 0:
        pytest.skip("the kernel refuses AMX tile state here")
    return Kernels(library, isa)


@pytest.fixture(params=RUNNABLE or [pytest.param(None, marks=pytest.mark.skip("no AVX2"))])
def native(request) -> Kernels:
    return _load(request.param)


def _int4_weights(out_features: int, in_features: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=g)
    scales = torch.rand(out_features, in_features // 32, generator=g) * 0.02
    mins = -torch.rand(out_features, in_features // 32, generator=g) * 0.1
    halves = q.view(out_features, -1, 2, 16)
    qs = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(out_features, -1).contiguous()
    groups = q.view(out_features, -1, 32).float()
    dense = (groups * scales[..., None] + mins[..., None]).view(out_features, in_features)
    return qs, scales, mins, dense


def _close(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 17, 64, 100])
def test_int4_products_match_the_dequantized_weights(native, rows):
    qs, scales, mins, dense = _int4_weights(96, 128)
    x = torch.randn(rows, 128).bfloat16()
    expected = x.float() @ dense.bfloat16().float().T
    # bf16 output: about 3 significant digits
    assert _close(native.int4_linear(x, qs, scales, mins), expected) < 8e-3


def _reference_attention(q, k_cache, v_cache, tables, lens, scale):
    out = torch.empty(q.shape, dtype=torch.float32)
    group = q.shape[1] // k_cache.shape[2]
    for b, length in enumerate(lens.tolist()):
        k = k_cache[tables[b]].flatten(0, 1)[:length].float().repeat_interleave(group, dim=1)
        v = v_cache[tables[b]].flatten(0, 1)[:length].float().repeat_interleave(group, dim=1)
        weights = (torch.einsum("hd,lhd->hl", q[b].float(), k) * scale).softmax(-1)
        out[b] = torch.einsum("hl,lhd->hd", weights, v)
    return out


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim",
    [(9, 3, 64), (4, 4, 64), (32, 8, 128), (8, 1, 64)],
)
def test_paged_decode_attention_matches_softmax_attention(native, heads, kv_heads, head_dim):
    block_size, num_blocks = 16, 96
    # a single token, one partial block, several blocks, and enough tokens for two threads
    lens = torch.tensor([1, 7, 50, 700, 1300])
    max_blocks = -(-int(lens.max()) // block_size)
    torch.manual_seed(0)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).bfloat16()
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).bfloat16()
    # each sequence's blocks scattered over the pool; tables padded with block 0 past the end
    tables = torch.zeros(len(lens), max_blocks, dtype=torch.int64)
    for b, length in enumerate(lens.tolist()):
        used = -(-length // block_size)
        tables[b, :used] = torch.randperm(num_blocks)[:used]
    q = torch.randn(len(lens), heads, head_dim).bfloat16()
    scale = head_dim**-0.5
    got = native.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    expected = _reference_attention(q, k_cache, v_cache, tables, lens, scale)
    assert (got.float() - expected).abs().max().item() < 2e-2


def test_the_widest_build_the_flags_allow_comes_first():
    amx_cpu = frozenset(
        [
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512dq",
            "avx512_bf16",
            "amx_tile",
            "amx_bf16",
        ]
    )
    assert isas_for(amx_cpu) == ["amx", "avx512_bf16", "avx2"]
    assert isas_for(frozenset(["avx2", "fma", "f16c", "avx512f", "avx512bw"])) == ["avx2"]
    assert isas_for(frozenset(["sse4_2"])) == []


@pytest.fixture
def fresh_choice():
    cpu_kernels.kernels.cache_clear()
    yield
    cpu_kernels.kernels.cache_clear()


def test_the_environment_switch_turns_the_kernels_off(monkeypatch, fresh_choice):
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "0")
    assert cpu_kernels.kernels() is None


def test_the_environment_switch_picks_one_build(monkeypatch, fresh_choice):
    if not RUNNABLE:
        pytest.skip("no build runs on this CPU")
    narrowest = RUNNABLE[-1]
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, narrowest)
    assert cpu_kernels.kernels().isa == narrowest
    cpu_kernels.kernels.cache_clear()
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "amx")  # a build this CPU cannot run: none
    assert cpu_kernels.kernels() is None


def test_a_failed_build_leaves_the_torch_path(monkeypatch, tmp_path, fresh_choice):
    if not RUNNABLE:
        pytest.skip("no build runs on this CPU")
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CXX", "false")  # a compiler that always fails
    with pytest.raises(RuntimeError, match="failed"):
        build(RUNNABLE[0])
    assert cpu_kernels.kernels() is None
    assert not list(tmp_path.rglob("*.so*"))  # no partial library left behind


def test_decode_attention_writes_each_new_token_before_attending(native):
    """The pure-decode form: strided q/k/v rows (views into one fused projection output), each
    sequence's new K/V written to its slot, then attended to as the last position."""
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    lens = torch.tensor([1, 20, 33])
    tables = torch.tensor([[4, 0, 0], [2, 7, 0], [1, 3, 6]])
    slots = torch.tensor(
        [int(tables[b, (n - 1) // block_size]) * block_size + (n - 1) % block_size
         for b, n in enumerate(lens.tolist())]
    )  # fmt: skip
    torch.manual_seed(1)
    k_cache = torch.randn(8, block_size, kv_heads, head_dim).bfloat16()
    v_cache = torch.randn_like(k_cache)
    fused = torch.randn(3, (heads + 2 * kv_heads) * head_dim).bfloat16()
    q = fused[:, : heads * head_dim].view(3, heads, head_dim)
    k = fused[:, heads * head_dim : (heads + kv_heads) * head_dim].view(3, kv_heads, head_dim)
    v = fused[:, (heads + kv_heads) * head_dim :].view(3, kv_heads, head_dim)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_k.view(-1, kv_heads, head_dim)[slots] = k
    expected_v.view(-1, kv_heads, head_dim)[slots] = v
    expected = _reference_attention(q, expected_k, expected_v, tables, lens, head_dim**-0.5)
    got = native.paged_decode_attention(
        q, k_cache, v_cache, tables, lens, head_dim**-0.5, new_kv=(k, v, slots)
    )
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    assert (got.float() - expected).abs().max().item() < 2e-2
