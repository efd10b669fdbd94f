"""Recipes and overrides, token shards, deterministic sampling, SFT assistant masks, MoE losses and statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opengpt.model.moe import load_balancing_loss, router_z_loss
from opengpt.train import data as D
from opengpt.train.recipe import RecipeError, load_recipe
from opengpt.train.trainer import expert_utilization
from tests.model.test_transformer import build


def test_recipe_yaml_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: 100\nlr: 1.0e-3\nlora: {rank: 4}\nbetas: [0.9, 0.99]\n")
    cfg = load_recipe(recipe, ["--max-steps", "20", "--out-dir=runs/x", "--grad-checkpointing", "--lora.alpha", "32",
                               "--model-overrides", "{hidden_size: 64}", "--autocast", "null"])
    assert (cfg.max_steps, cfg.lr, cfg.out_dir, cfg.grad_checkpointing) == (20, 1e-3, "runs/x", True)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.betas, cfg.model_overrides) == (4, 32.0, (0.9, 0.99), {"hidden_size": 64})
    with pytest.raises(RecipeError, match="unknown field.*max_step"):
        load_recipe(recipe, ["--max-step", "3"])
    with pytest.raises(RecipeError, match="cannot read 'many'"):
        load_recipe(recipe, ["--max-steps", "many"])


def test_shards_and_deterministic_sampling(corpus_dir, tmp_path):
    tok = D.train_bpe_tokenizer(str(corpus_dir), 300, tmp_path / "tok")
    meta = D.prepare_shards(str(corpus_dir), tok, tmp_path, val_fraction=0.1, progress=False)
    train = np.fromfile(tmp_path / "train.bin", dtype=meta["dtype"])
    val = np.fromfile(tmp_path / "val.bin", dtype=meta["dtype"])
    assert meta["dtype"] == "uint16" and len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    text = "".join(t for _, t in D.iter_corpus(str(corpus_dir)))
    eos = min(tok.eos_token_ids)
    decoded = tok.decode([int(i) for i in np.concatenate([train, val]) if i != eos])
    assert decoded == text  # byte-level BPE: the shards hold the corpus losslessly
    windows = D.TokenWindows(tmp_path / "train.bin", meta["dtype"], 16)
    n = len(windows)
    epoch = [D.sample_index(i, n, seed=3) for i in range(n)]
    assert sorted(epoch) == list(range(n))  # each window once per epoch
    assert epoch == [D.sample_index(i, n, seed=3) for i in range(n)] != [D.sample_index(i, n, 4) for i in range(n)]
    ids, labels = D.collate([windows[0], windows[1]])
    assert ids.shape == labels.shape == (2, 16) and torch.equal(ids[0, 1:], labels[0, :-1])


def test_sft_mask_covers_only_assistant_tokens(default_gguf):
    tok, _ = D.load_tokenizer(str(default_gguf), "", None)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "2 + 3 = 5."}, {"role": "user", "content": "And 4 * 4?"},
                {"role": "assistant", "content": "16."}]
    ex = D.sft_example(tok, messages)
    full = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert ex.tokens.tolist() == tok.encode(full, add_special_tokens=False)  # same ids as inference would see
    # the target tokens, run by run, are exactly the assistant turns as the template closes them
    runs, cur = [], []
    for t, m in zip(ex.tokens.tolist(), ex.targets.tolist()):
        if m:
            cur.append(t)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == ["2 + 3 = 5.<|im_end|>\n", "16.<|im_end|>\n"]
    _, labels = D.collate([ex])
    kept = labels[labels != -100].tolist()
    assert kept == [t for t, m in zip(ex.tokens.tolist()[1:], ex.targets.tolist()[1:]) if m]


def test_builtin_chat_data_is_seeded():
    a, b = D.builtin_chats("arith-tools", 20, seed=1), D.builtin_chats("arith-tools", 20, seed=1)
    assert a == b and any(m["content"].startswith("<tool_call>") for c in a for m in c if m["role"] == "assistant")


def test_aux_losses_reach_the_router():
    model = build("moe-shared").train()
    out = model(torch.randint(0, 80, (2, 10)))
    assert len(out.router_logits) == 2  # layers 0 and 2 are MoE
    (load_balancing_loss(list(out.router_logits), 2) + router_z_loss(list(out.router_logits))).backward()
    routers = [b.mlp.router.weight for b in model.layers if b.is_moe]
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in routers)
    assert model.embed_tokens.weight.grad.abs().sum() > 0  # and flow on through the hidden states


def test_expert_utilization_on_a_hand_built_batch():
    big = 10.0
    # layer 0: 4 tokens; top-2 of each: (0, 1), (0, 2), (0, 1), (3, 2)  -> counts 3, 2, 2, 1
    l0 = torch.tensor([[big, big - 1, 0, 0], [big, 0, big - 1, 0], [big, big - 1, 0, 0], [0, 0, big - 1, big]])
    # layer 1: perfectly balanced
    l1 = torch.tensor([[big, big - 1, 0, 0], [0, 0, big, big - 1], [big - 1, big, 0, 0], [0, 0, big - 1, big]])
    util = expert_utilization((l0, l1), top_k=2)
    assert util.tolist() == [[3, 2, 2, 1], [2, 2, 2, 2]]
    # the Switch loss is E * sum(f * P): 1 when balanced, more when not
    assert load_balancing_loss([l1 * 0], 2).item() == pytest.approx(1.0)
    assert load_balancing_loss([l0], 2).item() > load_balancing_loss([l1], 2).item()
