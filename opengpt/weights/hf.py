"""Hugging Face checkpoints: config.json + safetensors (single file or sharded with an index).

One key table maps HF names to ours (gpt-fast style, `{}` for layer and expert indices). Our module
names follow HF's, so most entries are the identity minus the `model.` prefix; MoE experts are the
exception: HF stores one Linear per expert (Mixtral `w1/w3/w2`, Qwen/OLMoE `gate/up/down_proj`), or,
in transformers 5, a fused `gate_up_proj`; we stack them into (E, out, in) tensors. Conversion is
strict: unknown keys, missing keys and shape mismatches are errors that name the key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ConfigError, ModelConfig


class CheckpointError(ValueError):
    """A checkpoint we cannot load; the message names the file or key and how to fix it."""


_L = "model.layers.{}."
# HF key pattern -> our key. Expert tensors map to (our stacked key, which part) in EXPERT_MAP.
WEIGHT_MAP: dict[str, str] = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    **{_L + f"{n}.weight": "layers.{}." + f"{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")},
    **{
        _L + f"self_attn.{p}.{t}": "layers.{}." + f"self_attn.{p}.{t}"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        for t in ("weight", "bias")
    },
    _L + "self_attn.q_norm.weight": "layers.{}.self_attn.q_norm.weight",
    _L + "self_attn.k_norm.weight": "layers.{}.self_attn.k_norm.weight",
    **{_L + f"mlp.{p}.{t}": "layers.{}." + f"mlp.{p}.{t}" for p in ("gate_proj", "up_proj", "down_proj") for t in ("weight", "bias")},
    _L + "mlp.gate.weight": "layers.{}.mlp.router.weight",
    _L + "block_sparse_moe.gate.weight": "layers.{}.mlp.router.weight",
    **{_L + f"mlp.shared_expert.{p}.weight": "layers.{}." + f"mlp.shared_expert.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")},
    _L + "mlp.shared_expert_gate.weight": "layers.{}.mlp.shared_expert_gate.weight",
    # transformers 5 stacked experts: down_proj is already (E, H, I); gate_up_proj is split below.
    _L + "mlp.experts.down_proj": "layers.{}.mlp.experts.down_proj",
    _L + "block_sparse_moe.experts.down_proj": "layers.{}.mlp.experts.down_proj",
}
# Per-expert Linear weights (layer, expert) -> the stacked parameter they fill.
EXPERT_MAP: dict[str, str] = {
    **{_L + f"mlp.experts.{{}}.{p}.weight": f"layers.{{}}.mlp.experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")},
    **{
        _L + f"block_sparse_moe.experts.{{}}.{w}.weight": f"layers.{{}}.mlp.experts.{p}"
        for w, p in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))
    },
}
FUSED_GATE_UP = (_L + "mlp.experts.gate_up_proj", _L + "block_sparse_moe.experts.gate_up_proj")


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json; a Hugging Face checkpoint directory needs one")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); re-download the checkpoint") from e
    try:
        return ModelConfig.from_hf_config(hf)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from e


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-download it") from e
        files = [path / s for s in shards]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}; re-download them")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{path} has no *.safetensors files (PyTorch .bin checkpoints are not loaded, since unpickling runs "
            "code); convert them with transformers' save_pretrained(safe_serialization=True)"
        )
    return files


def iter_safetensors(files: list[Path], progress: bool = False):
    """Yield (key, tensor) from every file, turning corrupt or truncated files into CheckpointError."""
    from tqdm.auto import tqdm

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                keys = list(sf.keys())
                for k in tqdm(keys, desc=f"loading {f.name}", disable=not progress, leave=False):
                    yield k, sf.get_tensor(k)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f} is corrupt or truncated ({e}); re-download or re-save it") from e


def _pattern(key: str) -> tuple[str, list[int]]:
    nums = [int(n) for n in re.findall(r"(?<=\.)\d+(?=\.)", key)]
    return re.sub(r"(?<=\.)\d+(?=\.)", "{}", key), nums


def convert_hf_state_dict(items, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF (key, tensor) pairs -> our state dict. Raises CheckpointError naming unknown keys."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    unknown = []
    for key, t in items:
        pat, nums = _pattern(key)
        if pat in WEIGHT_MAP:
            out[WEIGHT_MAP[pat].format(*nums)] = t
        elif pat in EXPERT_MAP:
            experts.setdefault(EXPERT_MAP[pat].format(nums[0]), {})[nums[1]] = t
        elif pat in FUSED_GATE_UP:
            gate, up = t.chunk(2, dim=1)  # (E, 2I, H) -> 2 x (E, I, H)
            out[f"layers.{nums[0]}.mlp.experts.gate_proj"] = gate
            out[f"layers.{nums[0]}.mlp.experts.up_proj"] = up
        elif cfg.tie_word_embeddings and key == "lm_head.weight":
            continue  # some tied checkpoints store the shared matrix twice
        elif key.endswith("rotary_emb.inv_freq"):
            continue  # a derived buffer older checkpoints saved
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unexpected tensor keys for {cfg.architecture}: {', '.join(sorted(unknown)[:10])}"
                              + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""))
    for name, by_index in experts.items():
        missing = [i for i in range(cfg.num_experts) if i not in by_index]
        if missing:
            raise CheckpointError(f"missing tensors for experts {missing} of {name}")
        out[name] = torch.stack([by_index[i] for i in range(cfg.num_experts)])  # (E, out, in)
    return out


def check_state_dict(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """Strict key and shape check against the model's own (meta) state dict."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor keys: {', '.join(missing[:10])}"
                              + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor keys: {', '.join(unexpected[:10])}")
    for k, t in sd.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{source}: tensor {k} has shape {tuple(t.shape)}, the config implies {tuple(expected[k].shape)}"
            )


def read_hf_state_dict(path: str | Path, cfg: ModelConfig, progress: bool = False) -> dict[str, torch.Tensor]:
    files = safetensors_files(Path(path))
    return convert_hf_state_dict(iter_safetensors(files, progress), cfg)
