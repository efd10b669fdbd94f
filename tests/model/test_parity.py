"""Parity with transformers for every architecture we load: fp32 logits and 20 greedy tokens.

Each case is a tiny random checkpoint built and saved by transformers, loaded through our
production path (config.json -> ModelConfig, safetensors -> key table -> meta model). The cases
cover GQA/MQA, tied embeddings, each RoPE scaling kind, sliding windows shorter than the prompt,
q/k norms, biases, shared experts and dense layers interleaved with MoE layers.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from opengpt import LLM
from opengpt.engine.generate import Generation
from opengpt.engine.sampler import SamplingParams
from tests.conftest import save_hf_checkpoint

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, bos_token_id=2, eos_token_id=1)

CASES = {
    "llama-gqa-tied-llama3": ("LlamaConfig", dict(
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64))),
    "llama-mqa-bias-linear": ("LlamaConfig", dict(
        num_key_value_heads=1, attention_bias=True, mlp_bias=True,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "llama-yarn-headdim": ("LlamaConfig", dict(
        head_dim=24, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                          original_max_position_embeddings=64))),
    "mistral-sliding": ("MistralConfig", dict(sliding_window=5, head_dim=16)),
    "qwen2-bias-mixed-window": ("Qwen2Config", dict(
        num_hidden_layers=3, use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen3-qknorm-tied": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2moe-shared-interleaved": ("Qwen2MoeConfig", dict(
        num_hidden_layers=3, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3moe-sparse-step": ("Qwen3MoeConfig", dict(
        num_hidden_layers=3, num_experts=5, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
        decoder_sparse_step=2, norm_topk_prob=True)),
    "olmoe-clip": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2, clip_qkv=4.0)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    cls, extra = CASES[request.param]
    hf_config = getattr(transformers, cls)(**{**BASE, **extra})
    path = tmp_path_factory.mktemp(request.param)
    shard = "40KB" if request.param == "mixtral" else None  # exercise the sharded index path
    hf = save_hf_checkpoint(hf_config, path, max_shard_size=shard)
    return hf, LLM.load(path, dtype="float32")


def test_sharded_checkpoint_written(tmp_path):
    hf_config = transformers.MixtralConfig(**BASE, num_local_experts=4)
    save_hf_checkpoint(hf_config, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1


def prompt(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, BASE["vocab_size"], (2, n), generator=torch.Generator().manual_seed(seed))


def test_logits_match(pair):
    hf, llm = pair
    ids = prompt()  # longer than every sliding window above
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(llm.logits(ids), expected, atol=1e-4, rtol=1e-4)


def test_greedy_tokens_match(pair):
    hf, llm = pair
    ids = prompt(12, seed=1)[:1]
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    expected = out[0, ids.shape[1]:].tolist()
    ours = list(Generation(llm.model, ids[0].tolist(), SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)))
    assert ours == expected


def test_router_logits_returned(pair):
    hf, llm = pair
    cfg = llm.config
    out = llm.model(prompt(8))
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert len(out.router_logits) == n_moe
    for r in out.router_logits:
        assert r.shape == (2 * 8, cfg.num_experts)
