"""A tiny pretraining setup shared by the training tests: a small text corpus, a tiny MoE, a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from opengpt.train.recipe import TrainConfig, load_recipe

TINY_MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  moe_intermediate_size=32, intermediate_size=64, num_experts=4, num_experts_per_tok=2)


def write_corpus(path: Path) -> Path:
    """~60 KB of varied English-like text built from a seed (no network, same bytes every run)."""
    import random

    rng = random.Random(0)
    words = ["the", "king", "queen", "lord", "lady", "good", "night", "day", "love", "death", "sword", "crown", "man", "woman", "heart", "eye", "hand", "speak", "come", "go", "see", "know", "make", "take", "give", "think", "tell", "sweet", "fair", "noble"]
    path.mkdir(parents=True, exist_ok=True)
    for d in range(6):
        lines = []
        for _ in range(400):
            n = rng.randint(4, 10)
            lines.append(" ".join(rng.choice(words) for _ in range(n)).capitalize() + rng.choice(".!?"))
        (path / f"doc{d}.txt").write_text("\n".join(lines))
    return path


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_args(corpus: Path, out: Path, **over) -> list[str]:
    fields = dict(preset="tiny-moe", corpus=str(corpus), tokenizer="bpe:300", seq_len=32, batch_size=8,
                  max_steps=30, lr=3e-3, warmup_steps=3, eval_interval=10, eval_batches=2, log_interval=1,
                  save_interval=10, out_dir=str(out), data_dir=str(out.parent / "data"), seed=7)
    fields.update(over)
    args = ["--model-overrides", "{" + ", ".join(f"{k}: {v}" for k, v in TINY_MODEL.items()) + "}"]
    for k, v in fields.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def tiny_config(corpus: Path, out: Path, **over) -> TrainConfig:
    return load_recipe(None, tiny_args(corpus, out, **over))
