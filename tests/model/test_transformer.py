"""Model-internal invariants: the KV cache path equals a full forward, chunked prefill, meta-device conversion."""

from __future__ import annotations

import pytest
import torch
import transformers

from opengpt.config import ModelConfig
from opengpt.engine.kv_cache import KVCache
from opengpt.model.transformer import Transformer
from opengpt.weights.hf import check_state_dict, convert_hf_state_dict

SMALL = dict(vocab_size=80, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
VARIANTS = {
    "dense": dict(),
    "sliding-mixed": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "qk-norm-bias": dict(qk_norm="head", qkv_bias=True, o_bias=True),
    "moe-shared": dict(architecture="Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=40, mlp_only_layers=[1]),
}


def build(variant: str, dtype=torch.float32) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL, **VARIANTS[variant]))
    model.init_weights(std=0.2, seed=0)
    return model.to(dtype).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_incremental_decode_equals_full_forward(variant):
    model = build(variant)
    ids = torch.randint(0, 80, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits  # (2, 14, V)
        cache = KVCache(model.config, 2, 14, torch.float32)
        steps = [model(ids[:, :5], cache=cache).logits]  # a 5-token prefill, then one token at a time
        for t in range(5, 14):
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["dense", "sliding-mixed"])
def test_chunked_prefill_equals_one_pass(variant):
    model = build(variant)
    ids = torch.randint(0, 80, (1, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config, 1, 23, torch.float32)
        chunks = [model(ids[:, s : s + 7], cache=cache).logits for s in range(0, 23, 7)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


def test_bfloat16_close_to_float32():
    m32, m16 = build("moe-shared"), build("moe-shared", torch.bfloat16)
    ids = torch.randint(0, 80, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = m32(ids).logits, m16(ids).logits
    assert b.dtype == torch.float32  # logits are always returned in fp32
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_active_parameters_count_top_k_experts():
    model = build("moe-shared")
    cfg = model.config
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert model.num_parameters() - model.num_parameters(active=True) == n_moe * per_expert * 2


REAL_SHAPES = {
    "LlamaConfig": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256),
    "MixtralConfig": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                          num_key_value_heads=8, num_local_experts=8, vocab_size=32000),
    "Qwen2MoeConfig": dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
                           shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
                           num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=16, vocab_size=151936),
    "Qwen3MoeConfig": dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                           num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                           vocab_size=151936),
    "OlmoeConfig": dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                        num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=16, vocab_size=50304),
}


@pytest.mark.parametrize("cls", sorted(REAL_SHAPES))
def test_conversion_at_real_shapes_on_meta(cls):
    """Key table and shapes at real model sizes, without allocating: transformers' in-memory (fused) layout."""
    hf_config = getattr(transformers, cls)(**REAL_SHAPES[cls])
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config)
        cfg = ModelConfig.from_hf_config({**hf_config.to_dict(), "architectures": [type(hf).__name__]})
        ours = Transformer(cfg)
    sd = convert_hf_state_dict(hf.state_dict().items(), cfg)
    check_state_dict(sd, ours.state_dict(), cls)


@pytest.mark.parametrize("variant", ["dense", "sliding-mixed"])
def test_shifted_positions_without_cache(variant):
    """RoPE attention depends on relative positions only: a constant shift leaves the logits unchanged."""
    model = build(variant)
    ids = torch.randint(0, 80, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = model(ids).logits
        shifted = model(ids, positions=torch.arange(30, 42)[None]).logits
    torch.testing.assert_close(shifted, base, atol=1e-4, rtol=1e-4)
