"""Export a trained model as a Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer).

The tensor names come from inverting the loader's key table (`weights.hf.WEIGHT_MAP` / `EXPERT_MAP`),
so export and import cannot drift apart. Stacked expert weights are written one Linear per expert,
the layout transformers' own `save_pretrained` writes (and both loaders read). config.json is the
inverse of `ModelConfig.from_hf_config`: `from_hf_config(to_hf_config(cfg)) == cfg`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import ModelConfig
from ..tokenizer import Tokenizer
from ..weights.hf import EXPERT_MAP, WEIGHT_MAP, _pattern


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    mt = cfg.model_type
    hf: dict[str, Any] = {
        "architectures": [cfg.architecture], "model_type": mt, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})},
        "attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else (cfg.eos_token_id or None),
        "torch_dtype": cfg.torch_dtype, "dtype": cfg.torch_dtype,
    }
    if cfg.rope_scaling:
        hf["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.clip_qkv is not None:
        hf["clip_qkv"] = cfg.clip_qkv
    if mt in ("qwen2", "qwen2_moe"):
        hf.pop("attention_bias")
        hf["qkv_bias"] = cfg.qkv_bias
    hf["sliding_window"] = cfg.sliding_window
    hf["layer_types"] = list(cfg.layer_types)
    if mt in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        hf["use_sliding_window"] = cfg.sliding_window is not None
        hf["max_window_layers"] = next((i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention"),
                                       cfg.num_hidden_layers)
    if cfg.num_experts:
        hf.update(num_experts_per_tok=cfg.num_experts_per_tok, moe_intermediate_size=cfg.moe_intermediate_size,
                  norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=cfg.decoder_sparse_step,
                  mlp_only_layers=list(cfg.mlp_only_layers), router_aux_loss_coef=cfg.router_aux_loss_coef)
        if mt == "mixtral":
            hf.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.moe_intermediate_size)
        else:
            hf["num_experts"] = cfg.num_experts
        if mt == "qwen2_moe":
            hf["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
    return hf


def _inverse(table: dict[str, str], moe_prefix: str) -> dict[str, str]:
    inv: dict[str, str] = {}
    for hf_key, ours in table.items():
        if ("block_sparse_moe" in hf_key) != (moe_prefix == "block_sparse_moe") and (
                "block_sparse_moe" in hf_key or ".mlp.gate." in hf_key or "mlp.experts" in hf_key):
            continue  # the spelling of the other MoE family
        inv.setdefault(ours, hf_key)
    return inv


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensor names (experts unstacked). Raises KeyError naming a key with no HF name."""
    prefix = "block_sparse_moe" if cfg.model_type == "mixtral" else "mlp"
    weights, experts = _inverse(WEIGHT_MAP, prefix), _inverse(EXPERT_MAP, prefix)
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        pat, nums = _pattern(key)
        if pat in experts:
            for e in range(t.shape[0]):
                out[experts[pat].format(nums[0], e)] = t[e].contiguous()
        elif pat in weights:
            out[weights[pat].format(*nums)] = t.contiguous()
        else:
            raise KeyError(f"{key} has no Hugging Face name for {cfg.architecture}")
    return out


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    # Tokenizer has no public save yet; its backend and config are what a HF tokenizer directory holds.
    tokenizer._tok.save(str(out / "tokenizer.json"))
    config = {k: v for k, v in tokenizer.config.items() if isinstance(v, (str, int, float, bool, list, dict))}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def export_hf(model: torch.nn.Module, tokenizer: Tokenizer | None, out: str | Path, dtype: torch.dtype | None = None
              ) -> Path:
    """Write `out` as a HF checkpoint directory from a (non-sharded, LoRA-free) Transformer."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = model.config
    sd = {k: v.detach().to("cpu", dtype or v.dtype) for k, v in model.state_dict().items()
          if not k.startswith("rotary.")}
    tensors = to_hf_state_dict(sd, cfg)
    hf_cfg = to_hf_config(cfg)
    if dtype is not None:
        hf_cfg["torch_dtype"] = hf_cfg["dtype"] = str(dtype).removeprefix("torch.")
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
        if hf_cfg["eos_token_id"] is None and tokenizer.eos_token_ids:
            hf_cfg["eos_token_id"] = min(tokenizer.eos_token_ids)
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    return out
