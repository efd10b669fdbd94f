"""RoPE: inverse frequencies and attention scaling of every kind equal transformers' ROPE_INIT_FUNCTIONS."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from opengpt.model.rope import RopeParams, RotaryEmbedding, apply_rope, rope_inv_freq

HEAD_DIM, MAX_POS = 64, 4096
KINDS = {
    "default": dict(rope_type="default"),
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024),
    "yarn-mscale": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=512, mscale=1.0,
                        mscale_all_dim=0.8, beta_fast=16, beta_slow=2),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=1024),
}


def hf_config(params: dict):
    return transformers.LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, max_position_embeddings=MAX_POS,
                                    rope_parameters={"rope_theta": 50000.0, **params})


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("seq_len", [None, 3 * MAX_POS])
def test_inv_freq_matches_transformers(kind, seq_len):
    params = KINDS[kind]
    if kind == "default":  # transformers 5 computes the default kind inside the rotary module
        rot = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config(params))
        expected, expected_scale = rot.inv_freq, rot.attention_scaling
    else:
        expected, expected_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_config(params), "cpu", seq_len=seq_len)
    p = RopeParams.from_hf(params, HEAD_DIM, 50000.0, MAX_POS)
    inv_freq, scale = rope_inv_freq(p, seq_len)
    torch.testing.assert_close(inv_freq, expected.float(), atol=0, rtol=1e-6)
    assert scale == pytest.approx(expected_scale)


@pytest.mark.parametrize("kind", ["default", "yarn", "dynamic"])
def test_cos_sin_and_rotation_match_llama(kind):
    cfg = hf_config(KINDS[kind])
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hf_rot = LlamaRotaryEmbedding(cfg)
    ours = RotaryEmbedding(RopeParams.from_hf(KINDS[kind], HEAD_DIM, 50000.0, MAX_POS))
    positions = torch.arange(MAX_POS + 5, MAX_POS + 17)[None] if kind == "dynamic" else torch.arange(7, 19)[None]
    x = torch.randn(1, 4, positions.shape[1], HEAD_DIM)
    cos, sin = hf_rot(x, positions)
    our_cos, our_sin = ours(positions, torch.float32)
    torch.testing.assert_close(our_cos, cos)
    torch.testing.assert_close(our_sin, sin)
    q, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(apply_rope(x, our_cos, our_sin), q)


def test_old_and_new_dict_forms_agree():
    old = RopeParams.from_hf({"type": "linear", "factor": 2.0}, HEAD_DIM, 50000.0, MAX_POS)
    new = RopeParams.from_hf({"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}, HEAD_DIM, 10000.0, MAX_POS)
    assert old == new


def test_unknown_kind_is_named():
    with pytest.raises(ValueError, match="unsupported RoPE scaling 'longrope'.*supported: default, linear"):
        RopeParams.from_hf({"rope_type": "longrope"}, HEAD_DIM, 10000.0, MAX_POS)
