"""ModelConfig: serialisation round trip, GGUF metadata, presets, and what it refuses."""

from __future__ import annotations

import json

import pytest

from opengpt.config import PRESETS, ConfigError, ModelConfig


def test_round_trip_through_json():
    cfg = ModelConfig(architecture="Qwen2MoeForCausalLM", vocab_size=100, hidden_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=8, shared_expert_intermediate_size=32,
                      rope_scaling={"rope_type": "yarn", "factor": 4.0}, sliding_window=16,
                      layer_types=["sliding_attention", "full_attention", "full_attention"])
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_from_gguf_matches_preset(default_gguf):
    cfg = ModelConfig.from_gguf(default_gguf)
    preset = ModelConfig.preset("smollm2-135m")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rope_theta", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(cfg, field) == getattr(preset, field), field
    assert cfg.rms_norm_eps == pytest.approx(preset.rms_norm_eps)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    assert ModelConfig.preset(name).num_hidden_layers > 0


def test_moe_layer_selection():
    cfg = ModelConfig(num_hidden_layers=6, num_attention_heads=4, hidden_size=32, num_experts=4,
                      decoder_sparse_step=2, mlp_only_layers=[3])
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]


@pytest.mark.parametrize("bad,match", [
    (dict(architecture="GPT2LMHeadModel"), "unknown architecture 'GPT2LMHeadModel'; supported: LlamaForCausalLM"),
    (dict(num_attention_heads=6, num_key_value_heads=4), "multiple of num_key_value_heads"),
    (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(layer_types=["full_attention"]), "layer_types has 1 entries"),
])
def test_invalid_configs_are_explained(bad, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**{"num_hidden_layers": 2, **bad})


def test_hf_config_without_architectures():
    with pytest.raises(ConfigError, match="no 'architectures' entry"):
        ModelConfig.from_hf_config({"hidden_size": 8})
