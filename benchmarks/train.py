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
import statistics
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


def make_step(model: torch.nn.Module, ids: torch.Tensor):
    """One training step of `model` on `ids` (forward, cross-entropy, backward, AdamW)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(forward_only: bool = False):
        logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        if forward_only:
            return loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, opt


def timed(step, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench(models: dict[str, torch.nn.Module], ids: torch.Tensor, steps: int) -> list[dict]:
    """Activation bytes of each model, then `steps` timed steps taken in turns (ABAB...), so that a
    change in the machine's speed during the run hits every model alike; the median step is reported."""
    cuda = ids.is_cuda
    runs = {}
    for name, model in models.items():
        step, opt = make_step(model, ids)
        step()  # warm-up (allocator, kernels)
        act = saved_bytes(step)
        opt.zero_grad(set_to_none=True)
        runs[name] = (step, act, [])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps):
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]
        for name in order:
            runs[name][2].append(timed(runs[name][0], cuda))
    out = []
    for name, (_, act, times) in runs.items():
        dt = statistics.median(times)
        r = {"name": name, "tokens_per_s": ids.numel() / dt, "step_s": dt, "step_s_all": times, "activation_bytes": act}
        if cuda:
            r["peak_allocated_bytes_all_models"] = torch.cuda.max_memory_allocated()
        print(f"{name:>34}: {r['tokens_per_s']:10,.0f} tok/s  activations {act / 2**20:8.1f} MiB", flush=True)
        out.append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute dtype")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per model, taken in turns (median reported)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"), help="where to write the JSON")
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
        results += bench({"opengpt" + suffix: ours, "transformers" + suffix: hf}, ids, args.steps)
        del ours, hf
    by = {r["name"]: r for r in results}
    summary = {
        "speed_ratio_opengpt_over_transformers": by["opengpt"]["tokens_per_s"] / by["transformers"]["tokens_per_s"],
        "speed_ratio_with_grad_checkpointing": by["opengpt + grad checkpointing"]["tokens_per_s"]
        / by["transformers + grad checkpointing"]["tokens_per_s"],
        "activation_saving_grad_checkpointing": 1 - by["opengpt + grad checkpointing"]["activation_bytes"]
        / by["opengpt"]["activation_bytes"],
    }
    print(summary)
    write_json({"conditions": conditions(), "shape": SHAPE, "batch": args.batch, "seq_len": args.seq_len,
                "dtype": args.dtype, "device": args.device, "results": results, "summary": summary}, args.out)


if __name__ == "__main__":
    main()
