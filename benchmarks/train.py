"""Training speed and activation memory: opengpt vs a transformers model of the same shape.

Both take the same plain PyTorch step (forward, cross-entropy, backward, AdamW) on the same batch in
the same dtype, with and without per-block activation checkpointing (ours: `enable_grad_checkpointing`;
transformers: `gradient_checkpointing_enable`). Activation memory is the bytes autograd saves for the
backward (counted with saved-tensor hooks, so it is exact on any device); on CUDA the peak allocated
memory is recorded too. Writes benchmarks/results/train.json.

    python benchmarks/train.py [--device cuda] [--dtype bfloat16] [--steps 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import conditions, write_json
from opengpt.config import ModelConfig
from opengpt.model.transformer import Transformer
from opengpt.train.export import to_hf_config, to_hf_state_dict
from opengpt.train.trainer import enable_grad_checkpointing

SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True)


def saved_bytes(step) -> int:
    """Bytes of the tensors autograd keeps for the backward during one forward (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step(forward_only=True)
    loss.backward()
    return sum(seen.values())


def bench(name: str, model: torch.nn.Module, ids: torch.Tensor, steps: int, logits_of) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(forward_only: bool = False):
        logits = logits_of(model(ids))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        if forward_only:
            return loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()  # warm-up (allocator, kernels)
    act = saved_bytes(step)
    opt.zero_grad(set_to_none=True)
    if ids.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if ids.is_cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    out = {"name": name, "tokens_per_s": ids.numel() / dt, "step_s": dt, "activation_bytes": act}
    if ids.is_cuda:
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    print(f"{name:>28}: {out['tokens_per_s']:10,.0f} tok/s  activations {act / 2**20:8.1f} MiB", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    args = ap.parse_args()
    import transformers

    dtype = getattr(torch, args.dtype)
    cfg = ModelConfig(**SHAPE)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        ours = Transformer(cfg)
        ours.init_weights(seed=0)
        ours = ours.to(args.device, dtype).train()
        hf_cfg = transformers.LlamaConfig(**{k: v for k, v in to_hf_config(cfg).items() if k != "architectures"})
        hf_cfg._attn_implementation = "sdpa"
        hf = transformers.LlamaForCausalLM(hf_cfg)
        hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
        hf = hf.to(args.device, dtype).train()
        if ckpt:
            enable_grad_checkpointing(ours)
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        suffix = " + grad checkpointing" if ckpt else ""
        results.append(bench("opengpt" + suffix, ours, ids, args.steps, lambda o: o.logits))
        results.append(bench("transformers" + suffix, hf, ids, args.steps, lambda o: o.logits))
    by = {r["name"]: r for r in results}
    summary = {
        "speed_ratio_opengpt_over_transformers": by["opengpt"]["tokens_per_s"] / by["transformers"]["tokens_per_s"],
        "activation_saving_grad_checkpointing": 1 - by["opengpt + grad checkpointing"]["activation_bytes"]
        / by["opengpt"]["activation_bytes"],
    }
    print(summary)
    write_json({"conditions": conditions(), "shape": SHAPE, "batch": args.batch, "seq_len": args.seq_len,
                "dtype": args.dtype, "device": args.device, "results": results, "summary": summary}, args.out)


if __name__ == "__main__":
    main()
