"""The flash backend's input building, checked on a CPU: `FlashBackend` runs with stand-in
kernels that follow flash-attn's documented contract (varlen: packed rows split by
cu_seqlens; with_kvcache: int32 cache_seqlens, an int32 contiguous block table whose page
size is a multiple of 256, causal aligned to the bottom right) and must agree with the
reference backend on the same paged pool, for the gathered (block 16) and the paged (block 256)
layouts."""

import pytest
import torch

from pdserve.engine.attention import (
    AttentionMetadata,
    FlashBackend,
    PrefillSegment,
    ReferenceBackend,
    flash_prefill_inputs,
    gather_blocks,
)

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def _attend(q, k, v, scale):
    """q [S, H, D], k/v [L, KVH, D]; query i sits at position L - S + i (bottom-right causal)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    scores = torch.einsum("shd,lhd->hsl", q.double(), k) * scale
    s, n = q.shape[0], k.shape[0]
    visible = torch.arange(n)[None, :] <= torch.arange(s)[:, None] + (n - s)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hsl,lhd->shd", probs, v).to(q.dtype)


def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
    assert causal and cu_q.dtype == cu_k.dtype == torch.int32
    assert q.shape[0] == int(cu_q[-1]) and k.shape[0] == int(cu_k[-1])
    lens = (cu_q[1:] - cu_q[:-1]).tolist()
    assert max(lens) == max_q == max_k
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        out[a:b] = _attend(q[a:b], k[a:b], v[a:b], softmax_scale)
    return out


def fake_with_kvcache(
    q, k_cache, v_cache, cache_seqlens, block_table=None, softmax_scale=None, causal=False
):
    assert causal and cache_seqlens.dtype == torch.int32 and q.dim() == 4
    if block_table is not None:
        assert block_table.dtype == torch.int32 and block_table.is_contiguous()
        assert k_cache.shape[1] % 256 == 0, "Paged KV cache block size must be divisible by 256"
        k_seq = gather_blocks(k_cache, block_table.long())
        v_seq = gather_blocks(v_cache, block_table.long())
    else:
        assert k_cache.shape[0] == q.shape[0]
        k_seq, v_seq = k_cache, v_cache
    out = torch.empty_like(q)
    for b, n in enumerate(cache_seqlens.tolist()):
        out[b] = _attend(q[b], k_seq[b, :n], v_seq[b, :n], softmax_scale)
    return out


def build_case(block_size, lengths):
    """One packed batch: fresh prompts A (rows 0..), B, a chunk after a cached prefix,
    then two decodes; `lengths` = (A, B, cached, chunk, dec1_ctx, dec2_ctx)."""
    a, b, cached, chunk, dec1, dec2 = lengths
    g = torch.Generator().manual_seed(0)
    need = [a, b, cached + chunk, dec1, dec2]
    tables, next_block = [], 1
    for n in need:
        count = -(-n // block_size)
        tables.append(list(range(next_block + count - 1, next_block - 1, -1)))  # reversed ids
        next_block += count
    pool = torch.randn(2, next_block, block_size, KV_HEADS, HEAD_DIM, generator=g)
    starts = [0, 0, cached, dec1 - 1, dec2 - 1]
    news = [a, b, chunk, 1, 1]
    order = [0, 2, 1, 3, 4]  # the cached chunk sits between the two fresh prompts
    slots, prefills, dec_rows, dec_tables, dec_lens, row = [], [], [], [], [], 0
    for i in order:
        table, start, n = tables[i], starts[i], news[i]
        slots += [
            table[p // block_size] * block_size + p % block_size for p in range(start, start + n)
        ]
        if n == 1:
            dec_rows.append(row)
            dec_tables.append(table)
            dec_lens.append(start + 1)
        else:
            prefills.append(PrefillSegment(row, n, start + n, torch.tensor(table)))
        row += n
    width = max(len(t) for t in dec_tables)
    lens = torch.tensor(dec_lens)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        prefills=prefills,
        decode_token_index=torch.tensor(dec_rows),
        decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in dec_tables]),
        decode_context_lens=lens,
        decode_mask=(torch.arange(max(dec_lens))[None] < lens[:, None]).view(2, 1, 1, -1),
        decode_max_len=max(dec_lens),
    )
    q = torch.randn(row, HEADS, HEAD_DIM, generator=g)
    k = torch.randn(row, KV_HEADS, HEAD_DIM, generator=g)
    v = torch.randn(row, KV_HEADS, HEAD_DIM, generator=g)
    return q, k, v, pool, meta


@pytest.mark.parametrize(
    "block_size,lengths",
    [(16, (7, 21, 33, 5, 17, 40)), (256, (7, 300, 260, 9, 257, 513))],
    ids=["gathered-block16", "paged-block256"],
)
def test_flash_inputs_agree_with_reference(block_size, lengths):
    q, k, v, pool, meta = build_case(block_size, lengths)
    scale = HEAD_DIM**-0.5
    flash_pool, ref_pool = pool.clone(), pool.clone()
    flash = FlashBackend(varlen=fake_varlen, with_kvcache=fake_with_kvcache)
    got = flash.forward(q, k, v, flash_pool[0], flash_pool[1], meta, scale)
    expected = ReferenceBackend().forward(q, k, v, ref_pool[0], ref_pool[1], meta, scale)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flash_pool, ref_pool, atol=0, rtol=0)  # same KV written


def test_fresh_prompts_are_packed_into_one_varlen_call():
    # rows: A (0..6), cached chunk (7..11), B (12..32), decodes (33, 34)
    _, _, _, _, meta = build_case(16, (7, 21, 33, 5, 17, 40))
    fresh = flash_prefill_inputs(meta.prefills, torch.device("cpu"))
    assert fresh.cu_seqlens.tolist() == [0, 7, 28] and fresh.cu_seqlens.dtype == torch.int32
    assert fresh.max_seqlen == 21
    assert fresh.rows.tolist() == list(range(0, 7)) + list(range(12, 33))


def test_contiguous_fresh_rows_are_a_slice_and_no_fresh_rows_is_none():
    segs = [PrefillSegment(0, 3, 3, torch.tensor([1])), PrefillSegment(3, 2, 2, torch.tensor([2]))]
    fresh = flash_prefill_inputs(segs, torch.device("cpu"))
    assert fresh.rows == slice(0, 5) and fresh.cu_seqlens.tolist() == [0, 3, 5]
    cached_only = [PrefillSegment(0, 2, 6, torch.tensor([1, 2]))]
    assert flash_prefill_inputs(cached_only, torch.device("cpu")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "block_size,lengths",
    [(16, (7, 21, 33, 5, 17, 40)), (256, (7, 300, 260, 9, 257, 513))],
    ids=["gathered-block16", "paged-block256"],
)
def test_flash_attn_kernels_agree_with_reference_in_bf16(block_size, lengths):
    """The real kernels on the same batch: varlen, with_kvcache gathered and paged."""
    from pdserve.engine.attention import flash_available

    device = torch.device("cuda")
    if not flash_available(device):
        pytest.skip("flash-attn not installed or not supported on this GPU")
    q, k, v, pool, meta = build_case(block_size, lengths)
    q, k, v, pool = (t.to(device, torch.bfloat16) for t in (q, k, v, pool))
    meta = AttentionMetadata(
        slot_mapping=meta.slot_mapping.to(device),
        prefills=[
            PrefillSegment(s.token_start, s.num_tokens, s.context_len, s.block_table.to(device))
            for s in meta.prefills
        ],
        decode_token_index=meta.decode_token_index.to(device),
        decode_block_tables=meta.decode_block_tables.to(device),
        decode_context_lens=meta.decode_context_lens.to(device),
        decode_mask=meta.decode_mask.to(device),
        decode_max_len=meta.decode_max_len,
    )
    scale = HEAD_DIM**-0.5
    flash_pool, ref_pool = pool.clone(), pool.clone()
    got = FlashBackend().forward(q, k, v, flash_pool[0], flash_pool[1], meta, scale)
    expected = ReferenceBackend().forward(q, k, v, ref_pool[0], ref_pool[1], meta, scale)
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
