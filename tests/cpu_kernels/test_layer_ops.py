"""A decoder layer's elementwise work in native calls, against the torch ops it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_kernels import native  # noqa: F401 (the fixture: one loaded build per runnable ISA)

from pdserve.model.config import ModelConfig
from pdserve.model.llama import RotaryEmbedding, _rotate_half, rms_norm


def test_add_rms_norm_rounds_exactly_as_the_torch_path(native):  # noqa: F811
    torch.manual_seed(0)
    h = (torch.randn(5, 576) * 3).bfloat16()
    delta = torch.randn(5, 576).bfloat16()
    weight = torch.rand(576).bfloat16()
    expected_h = h + delta
    got = native.add_rms_norm(h, delta, weight, 1e-5)
    assert torch.equal(h, expected_h)  # updated in place, rounded as a bf16 add
    assert torch.equal(got, rms_norm(expected_h, weight, 1e-5))
    unchanged = h.clone()
    assert torch.equal(native.add_rms_norm(h, None, weight, 1e-5), rms_norm(h, weight, 1e-5))
    assert torch.equal(h, unchanged)


@pytest.mark.parametrize("head_dim", [64, 128, 40])
def test_rope_rotates_q_and_k_heads_in_place_and_leaves_v(native, head_dim):  # noqa: F811
    config = ModelConfig(
        vocab_size=8, hidden_size=4 * head_dim, intermediate_size=64, num_layers=1, num_heads=4,
        num_kv_heads=2, head_dim=head_dim, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=5000, tie_word_embeddings=True,
    )  # fmt: skip
    rotary = RotaryEmbedding(config, torch.device("cpu"))
    positions = torch.tensor([0, 1, 17, 4095])
    qkv = torch.randn(4, 8 * head_dim).bfloat16()
    rotated = 6  # 4 q heads and 2 k heads; the last 2 heads are v
    heads = qkv[:, : rotated * head_dim].view(4, rotated, head_dim).float()
    cos = rotary.cos[positions][:, None]
    sin = rotary.sin[positions][:, None]
    expected = heads * cos + _rotate_half(heads) * sin
    v_before = qkv[:, rotated * head_dim :].clone()
    native.rope(qkv, rotated, head_dim, positions, rotary.cos, rotary.sin)
    got = qkv[:, : rotated * head_dim].view(4, rotated, head_dim).float()
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=1e-2)
    assert torch.equal(qkv[:, rotated * head_dim :], v_before)


def test_silu_mul_matches_silu_of_gate_times_up(native):  # noqa: F811
    gate_up = (torch.randn(3, 2 * 96) * 8).bfloat16()
    gate, up = gate_up.float().chunk(2, dim=-1)
    torch.testing.assert_close(
        native.silu_mul(gate_up).float(), F.silu(gate) * up, atol=2e-2, rtol=1e-2
    )
