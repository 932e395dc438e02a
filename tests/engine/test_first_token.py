"""A first token sampled elsewhere (a disaggregated prefill) is emitted as soon as the decode
side admits the request (`emit_first_token`), not with the token of its first step: the
handoff's TTFT does not wait for that step."""

from __future__ import annotations

from pdserve.engine.sampler import SampledToken
from pdserve.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


def test_a_first_token_sampled_elsewhere_is_emitted_at_once(make_engine, long_text_ids):
    prompt = long_text_ids[:40]
    [expected] = make_engine().generate([prompt], GREEDY)
    eng = make_engine()
    first = SampledToken(expected.token_ids[0], None, None)
    rid = eng.add_request(prompt, GREEDY, first_token=first)
    out = eng.emit_first_token(rid)
    assert (out.request_id, out.new_token_ids, out.finished) == (rid, [first.token_id], False)
    assert eng.emit_first_token(rid) is None  # once
    outputs = eng.step()  # the prompt step: only the next token now
    assert [o.new_token_ids for o in outputs] == [[expected.token_ids[1]]]
    tokens = [first.token_id] + outputs[0].new_token_ids
    while eng.has_unfinished:
        tokens += [t for o in eng.step() for t in o.new_token_ids]
    assert tokens == expected.token_ids


def test_a_first_token_that_finishes_the_request_ends_it_without_a_step(make_engine, long_text_ids):
    eng = make_engine()
    rid = eng.add_request(long_text_ids[:30], SamplingParams(temperature=0.0, max_tokens=1),
                          first_token=SampledToken(42, None, None))  # fmt: skip
    out = eng.emit_first_token(rid)
    assert (out.new_token_ids, out.finish_reason) == ([42], "length")
    assert not eng.has_unfinished and eng.num_free_kv_blocks == eng.num_kv_blocks
    assert eng.step() == []


def test_a_request_without_a_first_token_has_nothing_to_emit(make_engine, long_text_ids):
    eng = make_engine()
    rid = eng.add_request(long_text_ids[:30], GREEDY)
    assert eng.emit_first_token(rid) is None
