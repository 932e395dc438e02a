"""A migrated request resumes on another engine exactly where the first one stopped.

The seeded sampler draws at (seed, output position), and the resumed tokens are recomputed
one per step through the decode path (as they were first computed), so an engine given the
prompt plus the tokens already streamed (``resume_token_ids``) must produce the rest of the
original stream, token for token and character for character, emitting nothing for them.
The river prompt diverged at its 15th token when the resumed tokens were recomputed in one
prefill chunk (float reduction order differs between the prefill and decode paths).
"""

from __future__ import annotations

import pytest

from pdserve.engine.block_hash import root_key
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import Sequence

PROMPT = "The three most useful habits of a careful engineer are"


def _run(engine, prompt_ids, params, resume=()):
    rid = engine.add_request(prompt_ids, params, resume_token_ids=resume)
    tokens, deltas, finish = [], [], None
    try:
        while engine.has_unfinished:
            for out in engine.step():
                assert out.request_id == rid and len(out.new_token_ids) == 1
                tokens += out.new_token_ids
                deltas.append(out.text_delta)
                finish = out.finish_reason
    finally:
        engine.abort(rid)  # a failed test leaves nothing behind in the shared engine
    return tokens, deltas, finish


GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True,
                        frequency_penalty=0.5, presence_penalty=0.3)  # fmt: skip
RIVER = "Tell a long story about river number 0."


@pytest.mark.parametrize(
    ("prompt", "params", "cut"),
    [(PROMPT, GREEDY, 7), (RIVER, GREEDY, 4), (PROMPT, SEEDED, 1), (PROMPT, SEEDED, 11)],
    ids=["greedy", "greedy-river", "seeded-penalties-1", "seeded-penalties-11"],
)
def test_resumed_request_continues_the_original_stream(engine, checkpoint, prompt, params, cut):
    prompt_ids = checkpoint.tokenizer.encode(prompt)
    tokens, deltas, finish = _run(engine, prompt_ids, params)
    assert len(tokens) == params.max_tokens and finish == "length"
    rest, rest_deltas, rest_finish = _run(engine, prompt_ids, params, resume=tokens[:cut])
    assert rest == tokens[cut:]
    assert rest_finish == "length"
    # the client's text: what the first engine sent before the cut, then the second's
    assert rest_deltas == deltas[cut:]


def test_resume_is_checked(engine, checkpoint):
    prompt_ids = checkpoint.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=3)
    with pytest.raises(ValueError, match="leave nothing of max_tokens"):
        engine.add_request(prompt_ids, params, resume_token_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="must be integers in"):
        engine.add_request(prompt_ids, params, resume_token_ids=[10**9])
    assert not engine.has_unfinished


def test_a_replayed_output_is_scheduled_one_token_a_step_as_decodes():
    """The prompt in one chunk (stopping at its end), then each resumed token alone, through
    the decode path; only the last one samples. A preempted sequence is unaffected."""
    sched = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8,
                      max_num_batched_tokens=64)  # fmt: skip
    seq = Sequence("r", [1, 2, 3, 4, 5, 6], max_tokens=8, root_key=root_key("fp", None),
                   arrival_index=0, output_token_ids=[7, 8, 9], replay_output=True)  # fmt: skip
    other = Sequence("p", [1, 2, 3], max_tokens=8, root_key=root_key("fp", None),
                     arrival_index=1, output_token_ids=[5, 6])  # fmt: skip
    sched.add(seq)
    sched.add(other)
    steps = []
    for _ in range(4):
        plan = sched.schedule()
        steps.append([(c.seq.request_id, c.start, c.num_tokens, c.samples, c.is_decode)
                      for c in plan.chunks])  # fmt: skip
        sched.update(plan, {c.seq.request_id: 0 for c in plan.chunks if c.samples})
    assert steps[0] == [("r", 0, 6, False, False), ("p", 0, 5, True, False)]
    assert steps[1] == [("r", 6, 1, False, True), ("p", 5, 1, True, True)]
    assert steps[2][0] == ("r", 7, 1, False, True)
    assert steps[3][0] == ("r", 8, 1, True, True)
