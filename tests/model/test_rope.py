"""RoPE equals transformers bit for bit: inv_freq/attention scaling of every kind against ROPE_INIT_FUNCTIONS,
cos/sin against LlamaRotaryEmbedding (dynamic growth/reset included), rotation against apply_rotary_pos_emb."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from opengpt.model.rope import KINDS, RopeParams, RotaryEmbedding, apply_rope, rope_cos_sin, rope_inv_freq

# name: (head_dim, theta, max_position_embeddings, HF scaling dict without theta)
CASES = {
    "default-llama3": (128, 500000.0, 8192, {"rope_type": "default"}),
    "linear-x2": (128, 10000.0, 4096, {"rope_type": "linear", "factor": 2.0}),
    "dynamic-x2": (128, 10000.0, 4096, {"rope_type": "dynamic", "factor": 2.0}),
    "dynamic-odd": (80, 1e6, 4096, {"rope_type": "dynamic", "factor": 1.7}),
    "yarn-qwen": (128, 1e6, 131072, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    "yarn-deepseek": (64, 10000.0, 163840, {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}),
    "yarn-gptoss": (64, 150000.0, 131072, {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                                           "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}),
    "yarn-implicit": (64, 10000.0, 4096, {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 1024,
                                          "attention_factor": 1.25}),
    "yarn-partial": (128, 10000.0, 8192, {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096,
                                          "partial_rotary_factor": 0.5}),
    "llama3.1": (128, 500000.0, 131072, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama3.2": (64, 500000.0, 131072, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def hf_config(name: str, old_form: bool = False) -> transformers.LlamaConfig:
    head_dim, theta, max_pos, rope = CASES[name]
    rope_kwargs = ({"rope_scaling": dict(rope), "rope_theta": theta} if old_form
                   else {"rope_parameters": {**rope, "rope_theta": theta}})
    return transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                    max_position_embeddings=max_pos, **rope_kwargs)


def ours(name: str) -> RopeParams:
    head_dim, theta, max_pos, rope = CASES[name]
    return RopeParams.from_hf(rope, head_dim, theta, max_pos)


def hf_inv_freq(name: str, seq_len=None) -> tuple[torch.Tensor, float]:
    cfg = hf_config(name)
    if cfg.rope_parameters["rope_type"] == "default":  # transformers 5 computes "default" inside the module
        return LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    return ROPE_INIT_FUNCTIONS[cfg.rope_parameters["rope_type"]](cfg, "cpu", seq_len=seq_len)


@pytest.mark.parametrize("name", sorted(CASES))
def test_inv_freq_and_scaling_equal_transformers(name):
    expected, expected_scale = hf_inv_freq(name)
    inv_freq, scale = rope_inv_freq(ours(name))
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == expected.shape
    assert torch.equal(inv_freq, expected)
    assert scale == expected_scale


@pytest.mark.parametrize("name", ["dynamic-x2", "dynamic-odd"])
@pytest.mark.parametrize("offset", [-1000, -1, 0, 1, 17, 3 * 4096 + 5])
def test_dynamic_seq_len_below_and_above_max_positions(name, offset):
    seq_len = CASES[name][2] + offset
    p = ours(name)
    assert torch.equal(rope_inv_freq(p, seq_len)[0], hf_inv_freq(name, seq_len)[0])  # HF's int path
    t = torch.tensor(seq_len)  # HF's in-module path computes the grown base as a float32 tensor
    assert torch.equal(rope_inv_freq(p, t)[0], hf_inv_freq(name, t)[0])
    grown = not torch.equal(rope_inv_freq(p, seq_len)[0], rope_inv_freq(p)[0])
    assert grown == (offset > 0)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cos_sin_equal_llama_rotary_embedding(name, dtype):
    g = torch.Generator().manual_seed(0)
    max_pos = CASES[name][2]
    positions = torch.randint(0, max_pos, (2, 9), generator=g)  # below max: dynamic does not grow
    x = torch.zeros(2, 4, 9, 1, dtype=dtype)
    cos, sin = LlamaRotaryEmbedding(hf_config(name))(x, positions)
    our_cos, our_sin = RotaryEmbedding(ours(name))(positions, dtype)
    assert our_cos.dtype == dtype and torch.equal(our_cos, cos) and torch.equal(our_sin, sin)


def test_dynamic_module_grows_keeps_and_resets_like_transformers():
    name, max_pos = "dynamic-x2", CASES["dynamic-x2"][2]
    hf, ours_rot = LlamaRotaryEmbedding(hf_config(name)), RotaryEmbedding(ours(name))
    original = ours_rot.inv_freq.clone()
    # ends (max position + 1) per call: short, grow, grow more, shorter but > max (keeps the longest),
    # == max (no reset), short (reset), grow again
    for end, expect_cached in [(100, max_pos), (max_pos + 50, max_pos + 50), (2 * max_pos, 2 * max_pos),
                               (max_pos + 10, 2 * max_pos), (max_pos, 2 * max_pos), (max_pos - 1, max_pos),
                               (max_pos + 7, max_pos + 7)]:
        positions = torch.stack([torch.arange(end - 5, end), torch.arange(end - 8, end - 3)])  # (2, 5)
        cos, sin = hf(torch.zeros(1), positions)
        our_cos, our_sin = ours_rot(positions, torch.float32)
        assert torch.equal(our_cos, cos) and torch.equal(our_sin, sin), end
        assert torch.equal(ours_rot.inv_freq, hf.inv_freq) and ours_rot.max_seq_len_cached == expect_cached
        assert torch.equal(ours_rot.inv_freq, original) == (expect_cached == max_pos)


@pytest.mark.parametrize("cos_batch", [2, 1])
def test_apply_rope_equals_apply_rotary_pos_emb(cos_batch):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 6, 11, 128, generator=g), torch.randn(2, 2, 11, 128, generator=g)
    positions = torch.randint(0, 30000, (cos_batch, 11), generator=g)
    cos, sin = RotaryEmbedding(ours("yarn-qwen"))(positions, torch.float32)  # (cos_batch, T, hd)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(apply_rope(q, cos, sin), hf_q) and torch.equal(apply_rope(k, cos, sin), hf_k)
    # bf16 activations with bf16 cos/sin, as in a bf16 model
    cos16, sin16 = cos.bfloat16(), sin.bfloat16()
    assert torch.equal(apply_rope(q.bfloat16(), cos16, sin16), apply_rotary_pos_emb(q.bfloat16(), q.bfloat16(),
                                                                                    cos16, sin16)[0])


def test_partial_rotary_rotates_the_first_channels_only():
    p = ours("yarn-partial")
    assert p.head_dim == 64
    x = torch.randn(1, 3, 5, 128)
    cos, sin = rope_cos_sin(*rope_inv_freq(p)[:1], torch.arange(5)[None], rope_inv_freq(p)[1], torch.float32)
    out = apply_rope(x, cos, sin)  # (1, 3, 5, 128)
    assert torch.equal(out[..., :64], apply_rotary_pos_emb(x[..., :64], x[..., :64], cos, sin)[0])
    assert torch.equal(out[..., 64:], x[..., 64:])


def test_rotation_is_relative():
    """<R(m) q, R(n) k> depends on m - n only (RoFormer's property)."""
    rot = RotaryEmbedding(ours("default-llama3"))
    q, k = torch.randn(1, 1, 1, 128, dtype=torch.float64), torch.randn(1, 1, 1, 128, dtype=torch.float64)
    dots = []
    for m, n in [(7, 3), (1004, 1000)]:
        cq, sq = rot(torch.tensor([[m]]), torch.float64)
        ck, sk = rot(torch.tensor([[n]]), torch.float64)
        dots.append((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())
    torch.testing.assert_close(dots[0], dots[1], rtol=1e-5, atol=1e-5)


def test_meta_build_then_materialise_and_dtype_cast():
    with torch.device("meta"):
        rot = RotaryEmbedding(ours("llama3.1"))
    assert rot.inv_freq.is_meta
    rot.to_empty(device="cpu")
    rot.reset_parameters()
    expected, _ = hf_inv_freq("llama3.1")
    assert torch.equal(rot.inv_freq, expected)
    rot.to(torch.bfloat16)  # model.to(dtype) must not round the frequencies
    assert rot.inv_freq.dtype == torch.float32 and torch.equal(rot.inv_freq, expected)
    assert "inv_freq" not in rot.state_dict()
    with torch.device("meta"):
        rot = RotaryEmbedding(ours("yarn-qwen"))
    rot.reset_parameters(device="cpu")  # straight onto a real device
    assert torch.equal(rot.inv_freq, hf_inv_freq("yarn-qwen")[0])


@pytest.mark.parametrize("name", sorted(CASES))
def test_from_hf_old_and_v5_forms_agree(name):
    head_dim, theta, max_pos, rope = CASES[name]
    old = RopeParams.from_hf(rope, head_dim, theta, max_pos)  # rope_scaling + separate rope_theta
    v5 = RopeParams.from_hf({**rope, "rope_theta": theta}, head_dim, 1234.0, max_pos)  # dict theta wins
    assert old == v5
    if "rope_type" in rope:  # pre-4.45 spelling: "type"
        legacy = {("type" if k == "rope_type" else k): v for k, v in rope.items()}
        assert RopeParams.from_hf(legacy, head_dim, theta, max_pos) == old
    # transformers' own parse of both forms agrees with ours
    for cfg in (hf_config(name), hf_config(name, old_form=True)):
        params = RopeParams.from_hf(cfg.rope_parameters, head_dim, 1.0, max_pos)
        assert torch.equal(rope_inv_freq(params)[0], hf_inv_freq(name)[0])
    assert RopeParams(**old.to_dict()) == old


def test_from_hf_defaults():
    assert RopeParams.from_hf(None, 64, 10000.0, 2048) == RopeParams(64, 10000.0, max_position_embeddings=2048)
    assert RopeParams.from_hf({}, 64, 5.0, 100).kind == "default"
    p = RopeParams.from_hf({"rope_type": "yarn", "original_max_position_embeddings": 1024}, 64, 1e4, 4096)
    assert (p.factor, p.beta_fast, p.beta_slow, p.truncate) == (4.0, 32.0, 1.0, True)
    p = RopeParams.from_hf({"type": "llama3", "factor": 8.0}, 64, 1e4, 4096)
    assert (p.original_max_position_embeddings, p.low_freq_factor, p.high_freq_factor) == (4096, 1.0, 4.0)


@pytest.mark.parametrize("rope", [{"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]},
                                  {"type": "su"}, {"type": "mrope", "mrope_section": [16, 24, 24]},
                                  {"rope_type": "default", "mrope_section": [16, 24, 24]}, {"rope_type": "nope"}])
def test_unsupported_kinds_are_named(rope):
    kind = rope.get("rope_type", rope.get("type"))
    with pytest.raises(ValueError, match=f"unsupported RoPE scaling '{kind}'.*supported: {', '.join(KINDS)}"):
        RopeParams.from_hf(rope, 64, 10000.0, 2048)
