"""The default GGUF's weights equal what transformers' own GGUF loader produces (slow, ~20 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve.model.loader import load_checkpoint


@pytest.fixture(scope="module")
def hf_model(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("hf-gguf-model")
    (directory / default_gguf.name).symlink_to(default_gguf)
    return AutoModelForCausalLM.from_pretrained(
        str(directory), gguf_file=default_gguf.name, torch_dtype=torch.float32
    )


def test_weights_and_config_equal_transformers_gguf_loader(
    hf_model, shared_cache_dir: Path
) -> None:
    checkpoint = load_checkpoint(cache_dir=shared_cache_dir)
    state = hf_model.state_dict()
    # HF lists the tied head too; it is the embedding itself
    assert set(state) - set(checkpoint.weights) == {"lm_head.weight"}
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    for name, tensor in checkpoint.weights.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, state[name]), name

    hf, ours = hf_model.config, checkpoint.config
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size) == (
        hf.vocab_size,
        hf.hidden_size,
        hf.intermediate_size,
    )
    assert (ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim) == (
        hf.num_hidden_layers,
        hf.num_attention_heads,
        hf.num_key_value_heads,
        hf.head_dim,
    )
    assert (ours.rms_norm_eps, ours.max_position_embeddings) == (
        hf.rms_norm_eps,
        hf.max_position_embeddings,
    )
    rope_theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    assert ours.rope_theta == rope_theta
    assert ours.tie_word_embeddings == hf.tie_word_embeddings
    # greedy generation stops where HF's does
    eos = hf_model.generation_config.eos_token_id
    assert ours.eos_token_ids == tuple(eos if isinstance(eos, list) else [eos])
    assert ours.bos_token_id == hf_model.generation_config.bos_token_id
