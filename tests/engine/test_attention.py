"""Every available backend agrees with `reference`: varlen prefill with and without a cached
prefix, paged decode, grouped-query heads, lengths that straddle block boundaries."""

import pytest
import torch

from pdserve import cpu_kernels
from pdserve.engine.attention import (
    AttentionMetadata,
    PrefillSegment,
    ReferenceBackend,
    SdpaBackend,
    flash_available,
    select_backend,
)

BLOCK_SIZE = 4
HEADS, KV_HEADS, HEAD_DIM = 6, 2, 16
CPU_FP32 = {"dtype": torch.float32, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE}


def build_case(device, dtype, seed=0):
    """Three sequences in one packed batch: a fresh prefill (7 tokens), a chunk of 5 tokens after
    a cached prefix of 6, and two decodes at context lengths 9 and 13."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = 32
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=g).to(device, dtype)
    tables = {"fresh": [3, 7], "chunk": [1, 9, 4], "dec1": [5, 2, 11], "dec2": [8, 6, 10, 12]}
    # (name, start, num_new)
    layout = [("fresh", 0, 7), ("chunk", 6, 5), ("dec1", 8, 1), ("dec2", 12, 1)]
    slots, prefills, dec_rows, dec_tables, dec_lens = [], [], [], [], []
    row = 0
    for name, start, n in layout:
        table = tables[name]
        slots += [
            table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, start + n)
        ]
        if n == 1:
            dec_rows.append(row)
            dec_tables.append(table)
            dec_lens.append(start + 1)
        else:
            prefills.append(PrefillSegment(row, n, start + n, torch.tensor(table, device=device)))
        row += n
    width = max(len(t) for t in dec_tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in dec_tables], device=device)
    lens = torch.tensor(dec_lens, device=device)
    max_len = max(dec_lens)
    mask = (torch.arange(max_len, device=device)[None] < lens[:, None]).view(len(lens), 1, 1, -1)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        prefills=prefills,
        decode_token_index=torch.tensor(dec_rows, device=device),
        decode_block_tables=padded,
        decode_context_lens=lens,
        decode_mask=mask,
        decode_max_len=max_len,
    )
    q = torch.randn(row, HEADS, HEAD_DIM, generator=g).to(device, dtype)
    k = torch.randn(row, KV_HEADS, HEAD_DIM, generator=g).to(device, dtype)
    v = torch.randn(row, KV_HEADS, HEAD_DIM, generator=g).to(device, dtype)
    return q, k, v, k_cache, v_cache, meta


def naive(q, k, v, k_cache, v_cache, meta):
    """Attention written from scratch per token, independent of the backends' code."""
    kc, vc = k_cache.clone(), v_cache.clone()
    flat_k, flat_v = kc.view(-1, KV_HEADS, HEAD_DIM), vc.view(-1, KV_HEADS, HEAD_DIM)
    flat_k[meta.slot_mapping] = k
    flat_v[meta.slot_mapping] = v
    out = torch.empty(q.shape, dtype=torch.float64)
    seqs = [
        (s.token_start, s.num_tokens, s.context_len, s.block_table.tolist()) for s in meta.prefills
    ]
    for i, row in enumerate(meta.decode_token_index.tolist()):
        n = int(meta.decode_context_lens[i])
        seqs.append((row, 1, n, meta.decode_block_tables[i].tolist()))
    for start, n, ctx, table in seqs:
        slots = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(ctx)]
        keys, values = flat_k[slots].double(), flat_v[slots].double()
        for j in range(n):
            pos = ctx - n + j
            for h in range(HEADS):
                kv = h // (HEADS // KV_HEADS)
                scores = keys[: pos + 1, kv] @ q[start + j, h].double() / HEAD_DIM**0.5
                out[start + j, h] = scores.softmax(0) @ values[: pos + 1, kv]
    return out


def run(backend, case):
    q, k, v, k_cache, v_cache, meta = case
    return backend.forward(q, k, v, k_cache.clone(), v_cache.clone(), meta, HEAD_DIM**-0.5)


def test_reference_matches_naive():
    case = build_case("cpu", torch.float32)
    torch.testing.assert_close(
        run(ReferenceBackend(), case).double(), naive(*case), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sdpa_matches_reference_on_cpu(dtype, tol):
    case = build_case("cpu", dtype)
    torch.testing.assert_close(
        run(SdpaBackend(), case).float(), run(ReferenceBackend(), case).float(), atol=tol, rtol=tol
    )


@pytest.fixture
def native_spy():
    """The native kernels with their decode attention counted."""
    native = cpu_kernels.kernels()
    if native is None:
        pytest.skip("no native kernels on this machine")
    calls = []

    class Spy:
        def supports_attention(self, *shape):
            return native.supports_attention(*shape)

        def paged_decode_attention(self, *args, **kwargs):
            calls.append(args[0].shape)
            return native.paged_decode_attention(*args, **kwargs)

    return Spy(), calls


def test_native_paged_decode_matches_reference_on_a_bf16_pool(native_spy):
    spy, calls = native_spy
    case = build_case("cpu", torch.bfloat16)
    got = run(SdpaBackend(spy), case).float()
    torch.testing.assert_close(got, run(ReferenceBackend(), case).float(), atol=2e-2, rtol=2e-2)
    assert calls == [(2, HEADS, HEAD_DIM)]  # the step's two decodes, in one call


def test_a_pure_decode_step_writes_and_attends_in_one_native_call(native_spy):
    spy, calls = native_spy
    q, k, v, k_cache, v_cache, meta = build_case("cpu", torch.bfloat16)
    rows = meta.decode_token_index
    decodes = AttentionMetadata(
        slot_mapping=meta.slot_mapping[rows],
        prefills=[],
        decode_token_index=torch.arange(len(rows)),
        decode_block_tables=meta.decode_block_tables,
        decode_context_lens=meta.decode_context_lens,
        decode_mask=meta.decode_mask,
        decode_max_len=meta.decode_max_len,
    )
    case = (q[rows], k[rows], v[rows], k_cache, v_cache, decodes)
    reference_pool = (k_cache.clone(), v_cache.clone())
    expected = ReferenceBackend().forward(*case[:3], *reference_pool, decodes, HEAD_DIM**-0.5)
    got = SdpaBackend(spy).forward(*case, HEAD_DIM**-0.5)
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(k_cache, reference_pool[0]) and torch.equal(v_cache, reference_pool[1])
    assert calls == [(2, HEADS, HEAD_DIM)]


def test_the_exact_fp32_path_keeps_sdpa_for_decodes(native_spy):
    spy, calls = native_spy
    case = build_case("cpu", torch.float32)
    torch.testing.assert_close(run(SdpaBackend(spy), case), run(SdpaBackend(), case))
    assert calls == []


def test_backend_writes_new_kv_into_pool():
    q, k, v, k_cache, v_cache, meta = build_case("cpu", torch.float32)
    SdpaBackend().forward(q, k, v, k_cache, v_cache, meta, HEAD_DIM**-0.5)
    torch.testing.assert_close(k_cache.view(-1, KV_HEADS, HEAD_DIM)[meta.slot_mapping], k)
    torch.testing.assert_close(v_cache.view(-1, KV_HEADS, HEAD_DIM)[meta.slot_mapping], v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["sdpa", "flash"])
def test_cuda_backends_match_reference(name):
    device = torch.device("cuda")
    if name == "flash" and not flash_available(device):
        pytest.skip("flash-attn not installed")
    case = build_case(device, torch.float16)
    expected = run(ReferenceBackend(), case).float()
    torch.testing.assert_close(
        run(
            select_backend(
                name, device, dtype=torch.float16, head_dim=HEAD_DIM, block_size=BLOCK_SIZE
            ),
            case,
        ).float(),
        expected,
        atol=2e-3,
        rtol=2e-3,
    )


def test_unknown_backend_is_rejected_with_choices():
    with pytest.raises(ValueError, match="flash, sdpa, reference"):
        select_backend("magic", torch.device("cpu"), **CPU_FP32)
    with pytest.raises(ValueError, match="needs CUDA"):
        select_backend("flash", torch.device("cpu"), **CPU_FP32)
