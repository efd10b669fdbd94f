"""LoRA (Hu et al. 2021) as a module swap: adapt any linear layer, and MoE experts, without a second model tree.

`apply_lora(model, LoRAConfig)` turns each targeted `Linear` into a `LoRALinear` in place (same
weight Parameter, same state-dict key, plus `lora_A` (r, in) and `lora_B` (out, r)), and each
targeted MoE `Experts` into `LoRAExperts`, with one adapter per expert (A: (E, r, in), B: (E, out, r))
or one shared by all experts (A, B with a leading 1). The output is W x + (alpha / r) B A dropout(x);
B starts at zero, so an adapted model starts exactly equal to its base. Everything but the adapters
is frozen.

`merge_lora` folds B A into W (inference at base speed) and `unmerge_lora` takes it out again;
`merge_and_unload` also drops the adapters, leaving a plain model to export.

Adapters are saved in PEFT's format (`adapter_config.json` + `adapter_model.safetensors` with
`base_model.model.<HF module name>.lora_A.weight` keys), so PEFT loads them onto the transformers
model; `load_peft_adapter` reads PEFT adapters back. Expert adapters have no PEFT equivalent for
this layout; they are stored under `...mlp.experts.<proj>.lora_A.weight` keys with stacked shapes
and listed in the config's `opengpt_expert_targets`, which only opengpt reads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .model.layers import Linear, linear
from .model.moe import Experts

EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")


class LoRAError(ValueError):
    """A LoRA configuration or adapter file that does not fit the model."""


class LoRALinear(Linear):
    """A Linear with a low-rank update; built from an existing Linear by `LoRALinear.adapt`."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    @classmethod
    def adapt(cls, layer: Linear, rank: int, alpha: float, dropout: float) -> LoRALinear:
        layer.__class__ = cls  # keep the module object, its weight and its hooks; add the adapter
        w = layer.weight
        layer.lora_A = nn.Parameter(torch.empty(rank, w.shape[1], device=w.device, dtype=w.dtype))
        layer.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))  # PEFT's initialisation
        layer.scaling, layer.lora_dropout, layer.merged = alpha / rank, dropout, False
        return layer

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        if self.merged:
            return y
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return y + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling


class LoRAExperts(Experts):
    """Stacked MoE experts with a low-rank update per expert (or one shared) on gate, up and down."""

    @classmethod
    def adapt(cls, experts: Experts, rank: int, alpha: float, dropout: float, shared: bool) -> LoRAExperts:
        experts.__class__ = cls
        for p in EXPERT_PROJ:
            w = getattr(experts, p)  # (E, out, in)
            n = 1 if shared else w.shape[0]
            A = nn.Parameter(torch.empty(n, rank, w.shape[2], device=w.device, dtype=w.dtype))
            for a in A:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            setattr(experts, f"lora_A_{p}", A)
            setattr(experts, f"lora_B_{p}", nn.Parameter(torch.zeros(n, w.shape[1], rank, device=w.device,
                                                                     dtype=w.dtype)))
        experts.scaling, experts.lora_dropout, experts.merged = alpha / rank, dropout, False
        return experts

    def delta_weight(self, proj: str) -> torch.Tensor:
        A, B = getattr(self, f"lora_A_{proj}"), getattr(self, f"lora_B_{proj}")
        return torch.bmm(B, A) * self.scaling  # (E or 1, out, in)

    def _lora(self, proj: str, e: int, h: torch.Tensor) -> torch.Tensor:
        A, B = getattr(self, f"lora_A_{proj}"), getattr(self, f"lora_B_{proj}")
        i = 0 if A.shape[0] == 1 else e
        h = F.dropout(h, self.lora_dropout, self.training) if self.lora_dropout else h
        return F.linear(F.linear(h, A[i]), B[i]) * self.scaling

    def _expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return super()._expert(e, h)
        g = F.linear(h, self.gate_proj[e]) + self._lora("gate_proj", e, h)
        u = F.linear(h, self.up_proj[e]) + self._lora("up_proj", e, h)
        m = self.act(g) * u
        return F.linear(m, self.down_proj[e]) + self._lora("down_proj", e, m)

    def _gathered(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return super()._gathered(x, experts, weights)
        W = {p: getattr(self, p) + self.delta_weight(p) for p in EXPERT_PROJ}  # (E, out, in) each
        xe = x[:, None, None, :]
        h = self.act((W["gate_proj"][experts] * xe).sum(-1)) * (W["up_proj"][experts] * xe).sum(-1)
        y = (W["down_proj"][experts] * h[:, :, None, :]).sum(-1)
        return (y * weights[..., None]).sum(1)


# ---------------------------------------------------------------------------------------------- apply
def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: list[str] | tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
               shared_experts: bool = False) -> dict[str, int]:
    """Freeze the model and add adapters to the targeted layers. Returns trainable / total parameter counts."""
    if rank < 1:
        raise LoRAError(f"LoRA rank must be >= 1, got {rank}")
    targets = list(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    found: set[str] = set()
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, (LoRALinear, LoRAExperts)):
            raise LoRAError(f"{name} already has a LoRA adapter; load the base model again to change adapters")
        if isinstance(module, Experts) and "experts" in targets:
            LoRAExperts.adapt(module, rank, alpha, dropout, shared_experts)
            found.add("experts")
        elif leaf in targets and type(module) is Linear:
            LoRALinear.adapt(module, rank, alpha, dropout)
            found.add(leaf)
        elif leaf in targets and leaf != "experts":
            raise LoRAError(f"{name} is a {type(module).__name__}, not a float Linear; LoRA needs float weights "
                            "(load the model without --quantize)")
    missing = sorted(set(targets) - found)
    if missing:
        raise LoRAError(f"LoRA targets {missing} match no layer; linear layers are named q_proj, k_proj, v_proj, "
                        "o_proj, gate_proj, up_proj, down_proj, lm_head, and 'experts' adapts MoE experts")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}


def lora_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))]


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        if m.merged:
            continue
        if isinstance(m, LoRALinear):
            m.weight += m.delta_weight().to(m.weight.dtype)
        else:
            for p in EXPERT_PROJ:
                getattr(m, p).add_(m.delta_weight(p).to(getattr(m, p).dtype))
        m.merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        if not m.merged:
            continue
        if isinstance(m, LoRALinear):
            m.weight -= m.delta_weight().to(m.weight.dtype)
        else:
            for p in EXPERT_PROJ:
                getattr(m, p).sub_(m.delta_weight(p).to(getattr(m, p).dtype))
        m.merged = False


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and turn the layers back into plain Linear / Experts (a base-shaped model)."""
    merge_lora(model)
    for _, m in lora_modules(model):
        for name in [n for n, _ in m.named_parameters(recurse=False) if n.startswith("lora_")]:
            delattr(m, name)
        for attr in ("scaling", "lora_dropout", "merged"):
            m.__dict__.pop(attr, None)
        m.__class__ = Linear if isinstance(m, LoRALinear) else Experts
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------------------------- PEFT format
def _hf_module(name: str, cfg) -> str:
    """Our module name -> its HF module name (through the loader's key table, via export)."""
    from .train.export import to_hf_state_dict

    (hf_key,) = to_hf_state_dict({f"{name}.weight": torch.empty(0)}, cfg)
    return hf_key.removesuffix(".weight")


def _expert_hf_prefix(name: str, cfg) -> str:
    layer = name.split(".")[1]
    return f"model.layers.{layer}.{'block_sparse_moe' if cfg.model_type == 'mixtral' else 'mlp'}.experts"


def save_peft_adapter(model: nn.Module, out: str | Path, base_model: str = "") -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT's LoRA format)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    rank = alpha = dropout = None
    for name, m in lora_modules(model):
        if m.merged:
            raise LoRAError("unmerge the adapters (unmerge_lora) before saving them")
        if isinstance(m, LoRALinear):
            hf = _hf_module(name, cfg)
            tensors[f"base_model.model.{hf}.lora_A.weight"] = m.lora_A.detach().cpu().contiguous()
            tensors[f"base_model.model.{hf}.lora_B.weight"] = m.lora_B.detach().cpu().contiguous()
            targets.add(name.rsplit(".", 1)[-1])
            r = m.lora_A.shape[0]
        else:
            for p in EXPERT_PROJ:
                hf = f"{_expert_hf_prefix(name, cfg)}.{p}"
                tensors[f"base_model.model.{hf}.lora_A.weight"] = getattr(m, f"lora_A_{p}").detach().cpu().contiguous()
                tensors[f"base_model.model.{hf}.lora_B.weight"] = getattr(m, f"lora_B_{p}").detach().cpu().contiguous()
            targets.add("experts")
            r = m.lora_A_gate_proj.shape[1]
        rank, alpha, dropout = r, m.scaling * r, m.lora_dropout
    if rank is None:
        raise LoRAError("the model has no LoRA adapters to save")
    linear_targets = sorted(targets - {"experts"})
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
        "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": linear_targets, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None, "inference_mode": True,
        "init_lora_weights": True,
    }
    if "experts" in targets:
        config["opengpt_expert_targets"] = True
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def load_peft_adapter(model: nn.Module, path: str | Path) -> dict[str, int]:
    """Add the adapters of a PEFT LoRA directory to a base model (ours) and load their weights."""
    path = Path(path)
    cfg_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights_file.is_file():
        raise LoRAError(f"{path} is not a PEFT adapter: it needs adapter_config.json and adapter_model.safetensors")
    conf = json.loads(cfg_file.read_text())
    if conf.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{path} holds a {conf.get('peft_type')} adapter; only LORA adapters are supported")
    targets = conf.get("target_modules") or []
    if isinstance(targets, str):
        raise LoRAError(f"{cfg_file}: target_modules as a regex ({targets!r}) is not supported; list module names")
    if conf.get("opengpt_expert_targets"):
        targets = [*targets, "experts"]
    r, alpha = int(conf["r"]), float(conf.get("lora_alpha", conf["r"]))
    if conf.get("use_rslora"):
        alpha = alpha * r / math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r)
    tensors = load_file(str(weights_file))
    shared = any(k.endswith("experts.gate_proj.lora_A.weight") and v.shape[0] == 1 and model.config.num_experts > 1
                 for k, v in tensors.items())
    counts = apply_lora(model, r, alpha, float(conf.get("lora_dropout", 0.0)), targets, shared_experts=shared)
    cfg = model.config
    expected: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model):
        if isinstance(m, LoRALinear):
            hf = _hf_module(name, cfg)
            expected[f"base_model.model.{hf}.lora_A.weight"], expected[f"base_model.model.{hf}.lora_B.weight"] = \
                m.lora_A, m.lora_B
        else:
            for p in EXPERT_PROJ:
                hf = f"{_expert_hf_prefix(name, cfg)}.{p}"
                expected[f"base_model.model.{hf}.lora_A.weight"] = getattr(m, f"lora_A_{p}")
                expected[f"base_model.model.{hf}.lora_B.weight"] = getattr(m, f"lora_B_{p}")
    # PEFT sometimes drops the adapter name in keys and sometimes keeps it (".lora_A.default.weight").
    tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LoRAError(f"{weights_file} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k, p in expected.items():
            if tuple(tensors[k].shape) != tuple(p.shape):
                raise LoRAError(f"{weights_file}: {k} has shape {tuple(tensors[k].shape)}, expected {tuple(p.shape)}")
            p.copy_(tensors[k])
    return counts
