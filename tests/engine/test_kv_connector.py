"""The engine's KV-connector seam: the save side sees each step's completed blocks layer by
layer (bytes equal to the exported blocks), the load side reserves, loads layer by layer and
commits into the prefix cache (tokens equal to the offline engine), release gives every block
back, and first tokens sampled elsewhere come out of the step that schedules the request."""

from __future__ import annotations

import pytest

from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.kv_connector import KVSaver
from pdserve.engine.llm_engine import kv_block_nbytes
from pdserve.engine.sampler import SampledToken
from pdserve.engine.sampling_params import SamplingParams

# Payloads are read-only bytes (a kvstore's segment, or a copy): the pool is written from them
# without torch.frombuffer's warning about a buffer it could write.
pytestmark = pytest.mark.filterwarnings("error:The given buffer is not writable:UserWarning")

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


class RecordingSaver(KVSaver):
    def __init__(self, pick=lambda blocks: blocks) -> None:
        self.pick = pick
        self.steps: list[dict] = []

    def begin_save(self, blocks):
        picked = list(self.pick(list(blocks)))
        self.steps.append({"offered": list(blocks), "picked": picked, "layers": {}, "end": None})
        return picked

    def save_layer(self, layer, payloads):
        self.steps[-1]["layers"][layer] = list(payloads)

    def end_save(self, error):
        self.steps[-1]["end"] = error or "ok"


def _whole_blocks(step: dict, num_layers: int) -> list[bytes]:
    return [
        b"".join(step["layers"][layer][i] for layer in range(num_layers))
        for i in range(len(step["picked"]))
    ]


def test_save_side_gets_every_completed_block_layer_by_layer(make_engine, long_text_ids):
    saver = RecordingSaver()
    eng = make_engine(max_num_batched_tokens=32)
    eng.kv_saver = saver
    prompt = long_text_ids[:40]
    eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))
    keys = eng.block_keys(prompt)
    first, second = saver.steps[0], saver.steps[1]  # 32 tokens, then 8: blocks 0-1, none
    assert [(b.index, b.key) for b in first["offered"]] == [(0, keys[0]), (1, keys[1])]
    assert second["offered"] == [] and second["layers"] == {} and second["end"] == "ok"
    assert sorted(first["layers"]) == list(range(eng.model_config.num_layers))
    assert _whole_blocks(first, eng.model_config.num_layers) == eng.export_blocks(keys)
    assert first["end"] == "ok"


def test_saver_picks_a_subset_and_hears_of_a_failed_step(make_engine, long_text_ids, monkeypatch):
    saver = RecordingSaver(pick=lambda blocks: blocks[1:])
    eng = make_engine()
    eng.kv_saver = saver
    prompt = long_text_ids[:50]
    eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))
    step = saver.steps[0]
    assert [b.index for b in step["picked"]] == [1, 2]
    assert all(len(p) == 2 for p in step["layers"].values())
    assert _whole_blocks(step, eng.model_config.num_layers) == eng.export_blocks(
        eng.block_keys(prompt)[1:]
    )

    def explode(layer, plan):
        if layer == 3:
            raise RuntimeError("device lost")

    eng.add_request(long_text_ids[100:140], SamplingParams(max_tokens=1))
    with pytest.raises(RuntimeError, match="device lost"):
        eng.step(on_layer_done=explode)
    assert isinstance(saver.steps[-1]["end"], RuntimeError)
    assert sorted(saver.steps[-1]["layers"]) == [0, 1, 2]
    assert eng.num_free_kv_blocks == eng.num_kv_blocks


def test_load_layer_by_layer_then_commit_reproduces_the_offline_tokens(make_engine, long_text_ids):
    source = make_engine()
    prompt = long_text_ids[:200]
    [expected] = source.generate([prompt], GREEDY)
    keys = source.block_keys(prompt)
    payloads = source.export_blocks(keys)
    target = make_engine()
    load = target.start_load("r", prompt, len(keys))
    assert (load.first, load.num_to_load, load.keys_to_load) == (0, 12, tuple(keys))
    assert target.num_free_kv_blocks == target.num_kv_blocks - 12
    layer_bytes = target.layer_nbytes
    for layer in range(target.model_config.num_layers):  # newest layer last, as a prefill seals
        slices = [p[layer * layer_bytes : (layer + 1) * layer_bytes] for p in payloads]
        target.load_layer(load, layer, 0, slices)
    first = SampledToken(expected.token_ids[0], None, None)
    target.add_request(prompt, GREEDY, request_id="r", first_token=first, kv_load=load,
                       num_loaded_blocks=12)  # fmt: skip
    outputs = target.step()
    assert [o.new_token_ids for o in outputs] == [[expected.token_ids[0]], [expected.token_ids[1]]]
    assert outputs[0].num_cached_tokens == 192
    tokens = [t for o in outputs for t in o.new_token_ids]
    while target.has_unfinished:
        tokens += [t for o in target.step() for t in o.new_token_ids]
    assert tokens == expected.token_ids
    assert target.export_blocks(keys) == payloads
    with pytest.raises(ValueError, match="already committed"):
        target.load_blocks(load, 0, payloads[:1])


def test_load_layer_groups_then_commit_reproduces_the_offline_tokens(make_engine, long_text_ids):
    """``load_layers``: a group of layers of several blocks in one copy (the overlapped
    handoff's unit), in uneven groups, equals the exported blocks and the offline tokens."""
    source = make_engine()
    prompt = long_text_ids[:200]
    [expected] = source.generate([prompt], GREEDY)
    keys = source.block_keys(prompt)
    payloads = source.export_blocks(keys)
    target = make_engine()
    load = target.start_load("r", prompt, len(keys))
    n, num_layers = target.layer_nbytes, target.model_config.num_layers
    for layers in (range(0, 7), range(7, num_layers - 1), range(num_layers - 1, num_layers)):
        for start, stop in ((0, 5), (5, 12)):  # two runs of blocks
            data = b"".join(p[layers.start * n : layers.stop * n] for p in payloads[start:stop])
            target.load_layers(load, layers, start, bytearray(data))
    first = SampledToken(expected.token_ids[0], None, None)
    target.add_request(prompt, GREEDY, request_id="r", first_token=first, kv_load=load,
                       num_loaded_blocks=12)  # fmt: skip
    tokens = []
    while target.has_unfinished:
        tokens += [t for o in target.step() for t in o.new_token_ids]
    assert tokens == expected.token_ids
    assert target.export_blocks(keys) == payloads
    with pytest.raises(ValueError, match="already committed"):
        target.load_layers(load, range(0, 1), 0, bytearray(n))


def test_partial_load_caches_only_the_loaded_blocks_and_release_frees_all(
    make_engine, long_text_ids
):
    source = make_engine()
    prompt = long_text_ids[:100]
    [expected] = source.generate([prompt], GREEDY)
    keys = source.block_keys(prompt)
    target = make_engine()
    target.import_blocks(prompt, keys[:2], source.export_blocks(keys[:2]))
    load = target.start_load("p", prompt, len(keys))
    assert (load.first, load.num_to_load) == (2, 4)  # two already cached here
    target.load_blocks(load, 0, source.export_blocks(keys[2:4]))
    target.add_request(prompt, GREEDY, request_id="p", kv_load=load, num_loaded_blocks=2)
    outputs = []
    while target.has_unfinished:
        outputs += target.step()
    assert outputs[0].num_cached_tokens == 64
    assert [t for o in outputs for t in o.new_token_ids] == expected.token_ids

    again = target.start_load("q", long_text_ids[300:400], 6)
    assert again.num_to_load == 6
    target.release_load(again)
    target.release_load(again)  # idempotent
    assert target.num_free_kv_blocks == target.num_kv_blocks
    target.block_manager.check_invariants()


def test_first_token_that_finishes_the_request_is_its_only_output(make_engine, long_text_ids):
    eng = make_engine()
    prompt = long_text_ids[:30]
    rid = eng.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=1),
                          first_token=SampledToken(42, None, None))  # fmt: skip
    outputs = eng.step()
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in outputs] == [
        (rid, [42], "length")
    ]
    assert not eng.has_unfinished and eng.num_free_kv_blocks == eng.num_kv_blocks


def test_a_request_waits_for_blocks_that_kv_loads_hold_instead_of_failing(
    make_engine, long_text_ids
):
    """Overlapped handoffs reserve their blocks while the prefill runs elsewhere: a request
    that does not fit beside them must wait for them, not fail as if it could never fit."""
    block_bytes = kv_block_nbytes(EngineConfig(quantization="none", block_size=16))
    eng = make_engine(kv_cache_bytes=8 * block_bytes, block_size=16)
    assert eng.num_kv_blocks == 8
    prompt = long_text_ids[:100]  # 7 blocks with its output
    load = eng.start_load("held", long_text_ids[200:296], 6)  # 6 of the 8 blocks reserved
    assert load.num_to_load == 6 and eng.block_manager.num_reserved_blocks == 6
    eng.add_request(prompt, GREEDY, request_id="later")
    assert eng.step() == [] and eng.last_step_was_empty
    assert eng.has_unfinished  # still waiting, not failed
    eng.release_load(load)
    assert eng.block_manager.num_reserved_blocks == 0
    outputs = []
    while eng.has_unfinished:
        outputs += eng.step()
    assert outputs[-1].finished and outputs[-1].finish_reason == "length"
