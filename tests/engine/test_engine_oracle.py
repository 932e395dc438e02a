"""Greedy tokens equal Hugging Face transformers' on the same GGUF, alone, batched, chunked and
under preemption; prefix reuse computes only the suffix; every block comes back."""

import pytest
import torch

from pdserve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(900)

NEW_TOKENS = 64
PROMPT_LENGTHS = [1, 2, 9, 16, 17, 45, 130, 300, 600, 1100]


@pytest.fixture(scope="module")
def prompts(long_text_ids):
    return [long_text_ids[i * 7 : i * 7 + n] for i, n in enumerate(PROMPT_LENGTHS)]


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompts, engine):
    eos = sorted(engine.eos_token_ids)
    outputs = []
    with torch.inference_mode():
        for ids in prompts:
            out = hf_model.generate(
                torch.tensor([ids]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos[0],
            )
            outputs.append(out[0, len(ids) :].tolist())
    return outputs


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)


def assert_blocks_released(engine):
    bm = engine.block_manager
    bm.check_invariants()
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert bm.num_free_blocks == bm.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_greedy_matches_hf_batched_with_chunked_prefill(engine, prompts, hf_greedy):
    completions = engine.generate(prompts, GREEDY)
    for n, completion, expected in zip(PROMPT_LENGTHS, completions, hf_greedy, strict=True):
        assert completion.token_ids == expected, f"prompt of {n} tokens diverged from HF"
    assert_blocks_released(engine)


@pytest.mark.parametrize("backend", ["reference"])
def test_other_backend_matches_hf(make_engine, prompts, hf_greedy, backend):
    eng = make_engine(attention_backend=backend, max_num_batched_tokens=2048)
    picks = [0, 4, 9]
    completions = eng.generate([prompts[i] for i in picks], GREEDY)
    assert [c.token_ids for c in completions] == [hf_greedy[i] for i in picks]


def test_staggered_arrivals_match_solo_runs(make_engine, prompts, hf_greedy):
    eng = make_engine(max_num_batched_tokens=64)
    order = [5, 0, 8, 3, 9, 1, 6]
    pending = {f"r{i}": i for i in order}
    arrivals = {step: rid for step, rid in zip(range(0, 3 * len(order), 3), pending, strict=True)}
    results: dict[str, list[int]] = {rid: [] for rid in pending}
    step = 0
    while arrivals or eng.has_unfinished:
        if step in arrivals:
            rid = arrivals.pop(step)
            eng.add_request(prompts[pending[rid]], GREEDY, request_id=rid)
        for out in eng.step():
            results[out.request_id].extend(out.new_token_ids)
        step += 1
    for rid, i in pending.items():
        assert results[rid] == hf_greedy[i], f"{rid} (prompt {PROMPT_LENGTHS[i]} tokens)"
    assert_blocks_released(eng)


def test_preemption_under_a_small_pool_keeps_tokens_identical(make_engine, prompts, hf_greedy):
    # 100 blocks of 16 tokens: the 1,100-token prompt plus the others cannot all fit at once.
    eng = make_engine(kv_cache_bytes=100 * 737_280, max_num_batched_tokens=512)
    picks = [9, 8, 7, 6, 5]
    completions = eng.generate([prompts[i] for i in picks], GREEDY)
    assert eng.scheduler.num_preemptions > 0
    assert [c.token_ids for c in completions] == [hf_greedy[i] for i in picks]
    assert_blocks_released(eng)


def test_shared_prefix_reuses_cached_blocks(make_engine, long_text_ids):
    eng = make_engine(max_num_batched_tokens=2048)
    prefix = long_text_ids[:500]
    first = eng.generate([prefix + long_text_ids[600:620]], GREEDY)[0]
    computed_before = eng.stats.num_prompt_tokens_computed
    second_prompt = prefix + long_text_ids[700:730]
    second = eng.generate([second_prompt], GREEDY)[0]
    cached = (500 // 16) * 16
    assert second.num_cached_tokens == cached
    assert eng.stats.num_prompt_tokens_computed - computed_before == len(second_prompt) - cached
    cold = make_engine(max_num_batched_tokens=2048).generate([second_prompt], GREEDY)[0]
    assert second.token_ids == cold.token_ids
    assert first.num_cached_tokens == 0


def test_export_import_round_trip_is_bit_exact(make_engine, long_text_ids):
    source = make_engine()
    prompt = long_text_ids[:200]
    expected = source.generate([prompt], GREEDY)[0]
    keys = source.block_keys(prompt)
    payloads = source.export_blocks(keys)
    assert len(payloads) == 12 and all(len(p) == source.block_bytes for p in payloads)
    target = make_engine()
    assert target.import_blocks(prompt, keys, payloads) == 12
    assert target.export_blocks(keys) == payloads
    got = target.generate([prompt], GREEDY)[0]
    assert got.num_cached_tokens == 192
    assert got.token_ids == expected.token_ids
    with pytest.raises(KeyError):
        target.export_blocks([bytes(16)])
    with pytest.raises(ValueError, match="bytes"):
        target.import_blocks(prompt, keys[:1], [b"short"])


def test_abort_mid_decode_and_failed_step_release_blocks(make_engine, long_text_ids, monkeypatch):
    eng = make_engine()
    a = eng.add_request(long_text_ids[:100], SamplingParams(max_tokens=50, temperature=0))
    b = eng.add_request(long_text_ids[:40], SamplingParams(max_tokens=50, temperature=0))
    for _ in range(5):
        eng.step()
    assert eng.abort(a) and not eng.abort("no-such-request")
    eng.step()
    assert eng.abort(b)
    assert_blocks_released(eng)

    eng.add_request(long_text_ids[:30], SamplingParams(max_tokens=5))

    def explode(plan, on_layer_done=None):
        raise RuntimeError("device lost")

    monkeypatch.setattr(eng.runner, "execute", explode)
    with pytest.raises(RuntimeError, match="device lost"):
        eng.step()
    assert_blocks_released(eng)


def test_stream_closed_early_aborts(engine, long_text_ids):
    stream = engine.stream(long_text_ids[:20], SamplingParams(max_tokens=30, temperature=0))
    next(stream)
    stream.close()
    assert_blocks_released(engine)


def test_seeded_sampling_is_independent_of_batch(engine, long_text_ids):
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234)
    alone = engine.generate([long_text_ids[:30]], params)[0].token_ids
    crowd = engine.generate(
        [long_text_ids[50:90], long_text_ids[:30], long_text_ids[5:9]],
        [
            SamplingParams(max_tokens=30, temperature=1.0),
            params,
            SamplingParams(max_tokens=5, seed=7),
        ],
    )
    assert crowd[1].token_ids == alone


def test_stop_string_is_cut_and_not_returned(engine):
    base = engine.generate(["The capital of France is"], GREEDY)[0]
    words = base.text.split()
    assert len(words) > 3
    stop = words[2]
    cut = engine.generate(
        ["The capital of France is"], SamplingParams(max_tokens=64, temperature=0, stop=[stop])
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == base.text[: base.text.index(stop)]


def test_stop_token_ends_text_without_its_own_text(engine):
    base = engine.generate(["The capital of France is"], GREEDY)[0]
    stop_id = base.token_ids[3]
    cut = engine.generate(
        ["The capital of France is"],
        SamplingParams(max_tokens=64, temperature=0, stop_token_ids=[stop_id]),
    )[0]
    first = base.token_ids.index(stop_id)
    assert cut.finish_reason == "stop"
    assert cut.token_ids == base.token_ids[: first + 1]
    assert cut.text == engine.tokenizer.decode(base.token_ids[:first])


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ("", SamplingParams(), "prompt must not be empty"),
        ([], SamplingParams(), "prompt must not be empty"),
        ([1, 2, -5], SamplingParams(), r"prompt token ids must be integers in \[0, 49152\)"),
        ([1, 2, 10**9], SamplingParams(), "prompt token ids"),
        ([1] * 8192, SamplingParams(), "model's context is 8192 tokens"),
    ],
)
def test_invalid_requests_raise_clear_errors(engine, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished


def test_duplicate_request_id_and_bad_messages(engine):
    engine.add_request("hi", SamplingParams(max_tokens=1), request_id="dup")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("hi", SamplingParams(max_tokens=1), request_id="dup")
    engine.abort("dup")
    with pytest.raises(ValueError):
        engine.add_request(messages=[{"role": "user"}])
    with pytest.raises(ValueError, match="exactly one of prompt or messages"):
        engine.add_request("x", messages=[{"role": "user", "content": "x"}])
