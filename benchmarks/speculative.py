"""Speculative decoding speed: plain greedy vs prompt-lookup (n-gram) drafting, side by side in one run.

The default model continues a prompt that repeats itself (editing code: the answer quotes the
input), greedy, same weights and threads. Output equality is checked, the acceptance rate reported.
Writes benchmarks/results/speculative.json.

    python benchmarks/speculative.py [--dtype float32] [--new-tokens 128] [--k 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import conditions

PROMPT = '''Rename the variable `total` to `acc` in this function and return the whole function.

def summarize(values):
    total = 0
    for v in values:
        if v is None:
            continue
        total += v
    count = len([v for v in values if v is not None])
    return total / count if count else 0.0

Answer:

def summarize(values):
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens to generate")
    ap.add_argument("--k", type=int, default=4, help="drafted tokens per step")
    ap.add_argument("--out", default="benchmarks/results/speculative.json", help="where to write the JSON")
    args = ap.parse_args()

    from opengpt import LLM
    from opengpt.engine.generate import Generation
    from opengpt.engine.sampler import SamplingParams
    from opengpt.engine.speculative import NgramProposer, SpeculativeGeneration

    llm = LLM.load("default", dtype=args.dtype)
    ids = llm.tokenizer.encode(PROMPT)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    runs = {}
    for name, make in {
        "plain": lambda: Generation(llm.model, ids, params),
        "ngram": lambda: SpeculativeGeneration(llm.model, ids, params, NgramProposer(k=args.k)),
    }.items():
        list(make())  # warm-up
        gen = make()
        t = time.perf_counter()
        out = list(gen)
        dt = time.perf_counter() - t
        runs[name] = {"tok_s": len(out) / dt, "tokens": out, **getattr(gen, "stats", {})}
    a, b = runs["ngram"].pop("tokens"), runs["plain"].pop("tokens")
    same = a == b
    # bf16 rounds a (k+1)-token verification differently from one-token steps: near-ties may flip
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    s = runs["ngram"]
    result = {**conditions(), "dtype": args.dtype, "new_tokens": args.new_tokens, "k": args.k,
              "outputs_identical": same, "identical_leading_tokens": common, "speedup": s["tok_s"] / runs["plain"]["tok_s"],
              "acceptance_rate": s["accepted"] / max(1, s["proposed"]),
              "tokens_per_target_forward": args.new_tokens / s["target_forwards"], "runs": runs}
    print(f"plain {runs['plain']['tok_s']:.1f} tok/s, ngram {s['tok_s']:.1f} tok/s ({result['speedup']:.2f}x), "
          f"acceptance {result['acceptance_rate']:.0%}, {result['tokens_per_target_forward']:.2f} tokens/forward, "
          f"identical: {same} ({common} leading tokens)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
