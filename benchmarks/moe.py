"""MoE decode speed: a sparse MoE model vs its dense twin with the same active parameters, side by side.

Both models have the default model's shape (SmolLM2-135M: hidden 576, 30 layers, 9 heads / 3 KV
heads, vocabulary 49152, tied embeddings) and random weights (speed does not depend on the values).
The MoE model has 8 SwiGLU experts of intermediate 1536 per layer, top-2 routing; the dense twin has
one SwiGLU MLP of intermediate 2 x 1536 = 3072, so a token reads the same number of weights in both
(the router's 576 x 8 aside). Decode: a 32-token random prompt, 64 new tokens, greedy, EOS ignored;
eager and with the compiled decode step, in float32 and bfloat16. Speed is 1 / the median decode
step of a run; the two models run alternately and the ratio is taken per (dense, MoE) pair, so
bursts of CPU load from other work hit neither model alone.
Writes benchmarks/results/moe.json.

    python benchmarks/moe.py [--dtypes float32 bfloat16] [--new-tokens 64] [--repeats 3] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import conditions, time_tokens, write_json


def build(cfg, dtype: torch.dtype):
    from opengpt.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype).to_empty(device="cpu")
    model.init_weights(std=0.02, seed=0)
    return model.eval()


def configs(args):
    from opengpt.config import ModelConfig

    base = ModelConfig.preset("smollm2-135m")
    shape = {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "max_position_embeddings": 1024,
             "layer_types": None}  # derived again for the number of layers
    moe = ModelConfig(**{**base.to_dict(), **shape, "architecture": "MixtralForCausalLM",
                         "num_experts": args.experts, "num_experts_per_tok": args.top_k,
                         "intermediate_size": args.expert_intermediate,
                         "moe_intermediate_size": args.expert_intermediate})
    dense = ModelConfig(**{**base.to_dict(), **shape, "intermediate_size": args.top_k * args.expert_intermediate})
    return moe, dense


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="dtypes to measure")
    ap.add_argument("--hidden", type=int, default=576, help="hidden size of both models")
    ap.add_argument("--layers", type=int, default=30, help="layers of both models (all MoE in the sparse one)")
    ap.add_argument("--experts", type=int, default=8, help="routed experts per MoE layer")
    ap.add_argument("--top-k", type=int, default=2, help="experts per token")
    ap.add_argument("--expert-intermediate", type=int, default=1536,
                    help="intermediate size of one expert; the dense twin's is top-k times this")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="random prompt length")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run")
    ap.add_argument("--repeats", type=int, default=3, help="timed (dense, MoE) pairs per variant; median reported")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled decode step")
    ap.add_argument("--out", default="benchmarks/results/moe.json", help="where to write the JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from opengpt.engine.generate import CompiledDecoder, Generation
    from opengpt.engine.sampler import SamplingParams

    moe_cfg, dense_cfg = configs(args)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    warm = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    prompt = torch.randint(0, moe_cfg.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.tolist()
    result = {"conditions": conditions(), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "moe": {"experts": args.experts, "top_k": args.top_k, "expert_intermediate": args.expert_intermediate},
              "dense": {"intermediate": dense_cfg.intermediate_size}, "runs": {}}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        models = {"dense": build(dense_cfg, dtype), "moe": build(moe_cfg, dtype)}
        for name, m in models.items():
            result[name].update(total_params=m.num_parameters(), active_params=m.num_parameters(active=True))
        modes = {"eager": dict.fromkeys(models)}
        if not args.no_compile:
            modes["compiled"] = {name: CompiledDecoder(m) for name, m in models.items()}
        run = {}
        for mode, compiled in modes.items():
            entry: dict = {}
            for name, m in models.items():  # warm-up; for the compiled step this is the compile
                t = time.perf_counter()
                list(Generation(m, prompt, warm, compiled=compiled[name]))  # same cache size bucket
                if mode == "compiled":
                    entry[f"{name}_first_run_with_compile_s"] = time.perf_counter() - t
            rates: dict[str, list[float]] = {"dense": [], "moe": []}
            for _ in range(args.repeats):
                for name, m in models.items():
                    times = time_tokens(Generation(m, prompt, params, compiled=compiled[name]))
                    rates[name].append(times.median_step_tok_s)
            ratios = [d / s for d, s in zip(rates["dense"], rates["moe"])]
            entry.update(dense_decode_tok_s=statistics.median(rates["dense"]),
                         moe_decode_tok_s=statistics.median(rates["moe"]),
                         moe_slowdown_per_token=statistics.median(ratios), slowdown_per_pair=ratios)
            run[mode] = entry
            print(f"{dtype_name} {mode}: dense {entry['dense_decode_tok_s']:.1f} tok/s, MoE "
                  f"{entry['moe_decode_tok_s']:.1f} tok/s: MoE {entry['moe_slowdown_per_token']:.2f}x slower "
                  f"per token (target <= 1.3x)", flush=True)
        result["runs"][dtype_name] = run
        del models, modes
    result["target_met"] = all(e["moe_slowdown_per_token"] <= 1.3 for r in result["runs"].values() for e in r.values())
    write_json(result, args.out)


if __name__ == "__main__":
    main()
