"""The training loop behind `opengpt train` and `opengpt finetune`: pretraining and (LoRA) SFT, dense or MoE.

AdamW (fused where the build supports it; no decay on norms and biases), linear warmup then cosine
decay to `min_lr_ratio * lr` (a pure function of the step, so resuming needs no scheduler object),
gradient accumulation, global-norm clipping, optional bf16 autocast, per-block activation
checkpointing (torch.utils.checkpoint around each block's forward; the model is not touched), MoE
load-balancing (Switch) and router z-loss (ST-MoE) with per-layer expert utilization, periodic eval
loss and perplexity, metrics as JSONL (+ TensorBoard when installed) and a loss-curve PNG.

The loss is normalised by the number of target tokens in the whole global batch (all micro-batches,
all ranks), so one process and N processes with the same global batch take the same step.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..config import PRESETS, ModelConfig
from ..model.moe import load_balancing_loss, router_z_loss
from ..model.transformer import Transformer
from . import data as D
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistInfo, all_reduce_sum, cleanup, init_distributed, wrap_model
from .recipe import RecipeError, TrainConfig, save_recipe

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s for MFU, by device name.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def expert_utilization(router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor], top_k: int) -> torch.Tensor:
    """(layers, E) counts of routed (token, slot) pairs per expert, from each MoE layer's router logits."""
    return torch.stack([torch.bincount(torch.topk(r.float(), top_k, dim=-1).indices.flatten(),
                                       minlength=r.shape[-1]) for r in router_logits]).float()


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward instead of storing them."""
    for block in model.layers:
        block.forward = functools.partial(_checkpointed, block.forward)


def _checkpointed(forward, *args):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: str) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "norm" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    except (RuntimeError, ValueError) as e:  # a device or tensor type without the fused kernel
        log.info("fused AdamW unavailable (%s); using the foreach implementation", e)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=device != "meta")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class MetricsLog:
    """OUT_DIR/metrics.jsonl (one JSON object per record), TensorBoard when installed, the loss PNG."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.path, self.png, self.enabled = out_dir / "metrics.jsonl", out_dir / "loss.png", enabled
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                pass

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps the checkpoint does not include (they will be redone)."""
        if self.enabled and self.path.is_file():
            keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def plot(self) -> None:
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = [json.loads(line) for line in self.path.read_text().splitlines() if line]
        train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        val = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="eval loss", ms=3)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.png.with_suffix(".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(self.png)


def _model_and_data(cfg: TrainConfig, info: DistInfo, device: str, out: Path):
    """(model, tokenizer, tokenizer_dir, train set, val set) for pretraining or SFT."""
    from ..weights.load import load_model, resolve_dtype

    dtype = resolve_dtype(cfg.dtype)
    if cfg.sft_data:
        if cfg.model is None:
            raise RecipeError("SFT needs a base model: set `model:` (a checkpoint path or 'default')")
        _, model, tok, path = load_model(cfg.model, dtype=dtype, device=device)
        train_set, val_set = D.load_sft(cfg.sft_data, tok, cfg.seq_len, cfg.val_fraction, cfg.seed)
        return model.train(), tok, path if Path(path).is_dir() else None, train_set, val_set
    data_dir = Path(cfg.data_dir) if cfg.data_dir else out / "data"
    if info.is_main:  # tokenize once; the others wait and read the shards
        tok, tok_dir = D.load_tokenizer(cfg.tokenizer, cfg.corpus, data_dir, cfg.max_corpus_bytes)
        meta = D.prepare_shards(cfg.corpus, tok, data_dir, cfg.val_fraction, cfg.max_corpus_bytes)
    if info.enabled:
        torch.distributed.barrier()
    if not info.is_main:
        tok, tok_dir = D.load_tokenizer(cfg.tokenizer, cfg.corpus, data_dir, cfg.max_corpus_bytes)
        meta = json.loads((data_dir / "meta.json").read_text())
    train_set = D.TokenWindows(data_dir / "train.bin", meta["dtype"], cfg.seq_len)
    val_set = D.TokenWindows(data_dir / "val.bin", meta["dtype"], cfg.seq_len)
    if cfg.model is not None:
        _, model, _, _ = load_model(cfg.model, dtype=dtype, device=device)
        return model.train(), tok, tok_dir, train_set, val_set
    overrides = {"vocab_size": tok.vocab_size, "max_position_embeddings": max(cfg.seq_len, 128),
                 "eos_token_id": sorted(tok.eos_token_ids), **cfg.model_overrides}
    ModelConfig.preset(cfg.preset)  # names the known presets when this one is not
    mcfg = ModelConfig(**{**PRESETS[cfg.preset], **overrides})
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = Transformer(mcfg)
    model.init_weights(std=cfg.init_std, seed=cfg.seed)
    return model.to(dtype).train(), tok, tok_dir, train_set, val_set


@torch.no_grad()
def evaluate(model: nn.Module, val_set, cfg: TrainConfig, info: DistInfo, device: str, mb: int, autocast) -> float:
    """Mean loss per target token over the first eval_batches * batch_size validation items (fixed)."""
    was_training = model.training
    model.eval()
    n_items = min(cfg.eval_batches * cfg.batch_size, len(val_set))
    mine = list(range(n_items))[info.rank :: info.world_size]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for s in range(0, max(len(mine), 1), mb):
        idx = mine[s : s + mb] or [0]  # a rank without items still joins the FSDP all-gathers
        ids, labels = (t.to(device) for t in D.collate([val_set[i] for i in idx]))
        with autocast():
            logits = model(ids).logits
        nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        if mine[s : s + mb]:
            total += torch.stack([nll.double(), (labels != -100).sum().double()])
    all_reduce_sum(total)
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


def train(cfg: TrainConfig, resume: bool = False, merge: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run a recipe; returns a summary (final step, last loss, eval loss, output paths)."""
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    if info.enabled and device == "cuda":
        device = f"cuda:{info.local_rank}"
    out = Path(cfg.out_dir)
    ckpt_dir = out / "checkpoints"
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_recipe(cfg, out / "recipe.yaml")
    torch.manual_seed(cfg.seed)
    try:
        return _train(cfg, info, device, out, ckpt_dir, resume, merge, progress)
    finally:
        cleanup()


def _train(cfg, info, device, out, ckpt_dir, resume, merge, progress) -> dict[str, Any]:
    from tqdm.auto import tqdm

    model, tok, _, train_set, val_set = _model_and_data(cfg, info, device, out)
    mcfg: ModelConfig = model.config
    if cfg.lora is not None:
        from ..lora import apply_lora

        counts = apply_lora(model, **asdict(cfg.lora))
        if info.is_main:
            print(f"LoRA: trainable parameters {counts['trainable']:,} of {counts['total']:,} "
                  f"({100 * counts['trainable'] / counts['total']:.2f}%)")
    n_params = model.num_parameters()
    n_active = model.num_parameters(active=True)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    if cfg.compile:
        for block in model.layers:
            block.compile()
    autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.autocast or "")
    autocast = (functools.partial(torch.autocast, device.split(":")[0], dtype=autocast_dtype) if autocast_dtype
                else _null)
    core = model  # the Transformer itself; `model` may become a DDP wrapper
    model = wrap_model(model, info, cfg.parallel, device=device)
    optimizer = build_optimizer(model, cfg, device)

    if cfg.batch_size % info.world_size:
        raise RecipeError(f"batch_size {cfg.batch_size} must be divisible by the {info.world_size} processes")
    local = cfg.batch_size // info.world_size
    mb = cfg.micro_batch_size or local
    if local % mb:
        raise RecipeError(f"per-process batch {local} must be a multiple of micro_batch_size {mb}")

    metrics = MetricsLog(out, info.is_main)
    start, position = 0, 0
    if resume:
        extra = load_checkpoint(ckpt_dir, model, optimizer)
        if extra is None:
            raise RecipeError(f"--resume: no usable checkpoint in {ckpt_dir}")
        start, position = extra["step"], extra["position"]
        metrics.truncate_after(start)
    elif info.is_main and metrics.path.is_file():
        metrics.path.unlink()  # a fresh run starts a fresh log

    if info.is_main:
        kind = f"MoE {mcfg.num_experts}x top-{mcfg.num_experts_per_tok}, " if mcfg.num_experts else ""
        print(f"model: {mcfg.architecture} ({kind}{n_params / 1e6:.2f}M parameters, {n_active / 1e6:.2f}M active), "
              f"{len(train_set):,} training items, {info.world_size} process(es) on {device}")
    peak = next((v for k, v in PEAK_FLOPS.items() if device.startswith("cuda") and k in torch.cuda.get_device_name()),
                None)
    params = [p for p in model.parameters() if p.requires_grad]
    last: dict[str, Any] = {}
    eval_loss = None
    if cfg.eval_interval and start == 0 and not resume:
        eval_loss = evaluate(model, val_set, cfg, info, device, mb, autocast)
        metrics.write({"step": 0, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50))})
    bar = tqdm(total=cfg.max_steps, initial=start, desc="training", disable=not (progress and info.is_main),
               dynamic_ncols=True)
    t_start = time.perf_counter()
    step = start
    for step in range(start + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        lr = lr_at(step - 1, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        batch = D.global_batch(train_set, position, cfg.batch_size, cfg.seed)
        position += cfg.batch_size
        n_targets = sum(int(e.targets[1:].sum()) for e in batch)
        mine = batch[info.rank * local : (info.rank + 1) * local]
        stats = torch.zeros(4, dtype=torch.float64, device=device)  # nll sum, aux, z, tokens
        util = None
        for s in range(0, local, mb):
            ids, labels = (t.to(device) for t in D.collate(mine[s : s + mb]))
            with autocast():
                out_ = model(ids)
            nll = F.cross_entropy(out_.logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            # Gradients are averaged over ranks by FSDP/DDP, hence the world size factor.
            loss = nll * (info.world_size / max(n_targets, 1))
            if out_.router_logits:
                # Balanced per layer (the mean of each layer's Switch loss): the loss over all layers'
                # tokens at once only balances the aggregate, and lets single layers collapse onto one expert.
                aux = sum(load_balancing_loss([r], mcfg.num_experts_per_tok) for r in out_.router_logits)
                aux = aux / len(out_.router_logits)
                z = router_z_loss(list(out_.router_logits))
                loss = loss + (cfg.aux_loss_weight * aux + cfg.z_loss_weight * z) * (mb / local)
                stats[1] += aux.detach().double() * mb / local
                stats[2] += z.detach().double() * mb / local
                u = expert_utilization(out_.router_logits, mcfg.num_experts_per_tok)
                util = u if util is None else util + u
            loss.backward()
            stats[0] += nll.detach().double()
            stats[3] += ids.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        all_reduce_sum(stats)
        if util is not None:
            all_reduce_sum(util)
        dt = time.perf_counter() - t0
        loss_v = stats[0].item() / max(n_targets, 1)
        tok_s = stats[3].item() / dt
        last = {"step": step, "loss": loss_v, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tok_s,
                "elapsed_s": round(time.perf_counter() - t_start, 3)}
        if util is not None:
            share = util / util.sum(-1, keepdim=True)  # (layers, E) fraction of routed slots
            last.update(aux_loss=stats[1].item() / info.world_size, z_loss=stats[2].item() / info.world_size,
                        expert_max_share=float(share.max() * mcfg.num_experts),
                        expert_util=[[round(float(x), 4) for x in row] for row in share])
        if peak is not None:
            last["mfu"] = 6 * n_active * tok_s / (peak * info.world_size)
        bar.update()
        bar.set_postfix(loss=f"{loss_v:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            metrics.write(last)
        timed_out = cfg.max_seconds and time.perf_counter() - t_start > cfg.max_seconds
        if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.max_steps or timed_out:
            eval_loss = evaluate(model, val_set, cfg, info, device, mb, autocast)
            metrics.write({"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50))})
            metrics.plot()
        if (cfg.save_interval and step % cfg.save_interval == 0) or step == cfg.max_steps or timed_out:
            save_checkpoint(ckpt_dir, step, model, optimizer, {"position": position}, cfg.keep_last)
        if timed_out:
            break
    bar.close()
    summary: dict[str, Any] = {"step": step, "loss": last.get("loss"), "eval_loss": eval_loss,
                               "expert_max_share": last.get("expert_max_share"), "out_dir": str(out)}
    summary.update(_finish(core, model, cfg, info, tok, out, merge))
    if info.enabled:  # rank 0 exported alone; tearing the group down under it can abort gloo
        torch.distributed.barrier()
    if info.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _null():
    return contextlib.nullcontext()


def _finish(model, wrapped, cfg: TrainConfig, info: DistInfo, tok, out: Path, merge: bool) -> dict[str, str]:
    """Write the usable artefacts: the PEFT adapter (LoRA), a merged or full HF checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..lora import lora_modules, merge_and_unload, save_peft_adapter
    from .export import export_hf

    paths: dict[str, str] = {}
    if info.enabled:  # gather the full (unsharded) weights into a plain model on rank 0
        sd = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not info.is_main:
            return paths
        with torch.device("meta"):
            plain = Transformer(model.config)
        if cfg.lora is not None:
            from ..lora import apply_lora

            apply_lora(plain, **asdict(cfg.lora))
        plain.load_state_dict(sd, strict=True, assign=True)
        plain.rotary.to_empty(device="cpu")
        plain.rotary.reset_parameters()
        model = plain
    elif not info.is_main:
        return paths
    for block in model.layers:
        block.__dict__.pop("forward", None)  # undo grad checkpointing before export
    if lora_modules(model):
        paths["adapter"] = str(save_peft_adapter(model, out / "adapter", cfg.model or ""))
        if not merge:
            return paths
        merge_and_unload(model)
    name = "merged" if cfg.lora is not None else "final"
    paths["checkpoint"] = str(export_hf(model, tok, out / name))
    return paths
