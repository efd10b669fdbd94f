"""LoRA: merge/unmerge equivalence, only adapters train, PEFT-format parity with transformers + peft,
and `finetune --merge` writing a checkpoint both loaders open."""

from __future__ import annotations

import json

import pytest
import torch

from opengpt.lora import (
    LoRAError,
    apply_lora,
    load_peft_adapter,
    lora_modules,
    merge_and_unload,
    merge_lora,
    save_peft_adapter,
    unmerge_lora,
)
from tests.model.test_transformer import build

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts"]


def randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("shared", [False, True])
def test_merged_equals_unmerged_dense_and_experts(shared):
    model = build("moe-shared")
    ids = torch.randint(0, 80, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
    counts = apply_lora(model, rank=4, alpha=8, targets=ALL, shared_experts=shared)
    assert 0 < counts["trainable"] < counts["total"] * 0.2
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base)  # B = 0: starts at the base model
        randomize_adapters(model)
        adapted = model(ids).logits
        single = model(ids[:1, :1]).logits  # one token takes the experts' direct path
        assert (adapted - base).abs().max() > 1e-3
        merge_lora(model)
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(ids[:1, :1]).logits, single, atol=1e-5, rtol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)
        merge_and_unload(model)
        assert not lora_modules(model)
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(build("moe-shared").state_dict())


def test_training_updates_only_adapter_weights():
    model = build("moe-shared").train()
    apply_lora(model, rank=2, targets=["q_proj", "v_proj", "experts"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(torch.randint(0, 80, (2, 8))).logits.logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    assert any("experts.lora_B" in n for n in changed) and any("q_proj.lora_B" in n for n in changed)


def test_unknown_target_is_an_error():
    with pytest.raises(LoRAError, match="match no layer"):
        apply_lora(build("dense"), targets=["qproj"])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    import transformers

    from tests.conftest import save_hf_checkpoint

    path = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    save_hf_checkpoint(cfg, path)
    tc = json.loads((path / "tokenizer_config.json").read_text())
    tc["chat_template"] = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                           "{% if add_generation_prompt %}<s> assistant {% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps(tc))
    return path


def test_peft_adapter_loads_in_peft_with_the_same_logits(llama_dir, tmp_path):
    import peft
    import transformers

    from opengpt.weights.load import load_model

    _, ours, _, _ = load_model(llama_dir)
    apply_lora(ours, rank=4, alpha=8, targets=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    randomize_adapters(ours)
    save_peft_adapter(ours, tmp_path / "adapter", str(llama_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits.float()
        torch.testing.assert_close(ours(ids).logits, theirs, atol=1e-5, rtol=1e-4)
    # and back: PEFT's own save loads into ours
    hf.save_pretrained(tmp_path / "from_peft")
    _, again, _, _ = load_model(llama_dir)
    load_peft_adapter(again, tmp_path / "from_peft")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, theirs, atol=1e-5, rtol=1e-4)


def test_moe_expert_adapters_round_trip(tmp_path):
    model = build("moe-shared")
    apply_lora(model, rank=3, targets=["q_proj", "experts"])
    randomize_adapters(model)
    save_peft_adapter(model, tmp_path / "a")
    fresh = build("moe-shared")
    load_peft_adapter(fresh, tmp_path / "a")
    ids = torch.randint(0, 80, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits)


def test_finetune_merge_writes_a_checkpoint_both_loaders_open(llama_dir, tmp_path):
    import transformers

    from opengpt.train.recipe import load_recipe
    from opengpt.train.trainer import train
    from opengpt.weights.load import load_model

    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"t{3 + i % 20} t{5 + i % 7}"},
                          {"role": "assistant", "content": f"t{10 + i % 9}"}]} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_recipe(None, ["--model", str(llama_dir), "--sft-data", str(data), "--seq-len", "32", "--batch-size",
                             "4", "--max-steps", "6", "--lr", "1e-2", "--warmup-steps", "1", "--eval-interval", "3",
                             "--out-dir", str(tmp_path / "out"), "--lora.rank", "4",
                             "--lora.targets", "[q_proj, v_proj, down_proj]"])
    summary = train(cfg, merge=True, progress=False)
    assert (tmp_path / "out/adapter/adapter_config.json").is_file()
    merged = summary["checkpoint"]
    _, ours, tok, _ = load_model(merged)
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    _, base, _, _ = load_model(llama_dir)
    ids = torch.tensor([tok.encode("t3 t5 t7 t9")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits.float(), atol=1e-5, rtol=1e-4)
        assert (ours(ids).logits - base(ids).logits).abs().max() > 1e-4  # the adapters changed the model
    assert tok.has_chat_template
