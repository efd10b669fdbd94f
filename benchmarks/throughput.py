"""Throughput: N concurrent requests through continuous batching vs the same N one after another.

Default model, greedy, EOS ignored, same weights, dtype and threads, side by side in one run.
Writes benchmarks/results/throughput.json.

    python benchmarks/throughput.py [--requests 16] [--prompt-tokens 128] [--new-tokens 128] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import conditions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16, help="concurrent requests")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of each request")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--dtype", default="bfloat16", help="float32 or bfloat16")
    ap.add_argument("--max-batch-tokens", type=int, default=512, help="engine token budget per step")
    ap.add_argument("--out", default="benchmarks/results/throughput.json", help="where to write the JSON")
    args = ap.parse_args()

    from opengpt import LLM
    from opengpt.engine.engine import LLMEngine
    from opengpt.engine.generate import Generation
    from opengpt.engine.sampler import SamplingParams

    llm = LLM.load("default", dtype=args.dtype)
    words = Path(__file__).read_text().split()
    prompts = []
    for i in range(args.requests):  # different prompts: no prefix sharing
        ids = llm.tokenizer.encode(" ".join(words[i * 7 :] + words))
        prompts.append(ids[: args.prompt_tokens])
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    total = args.requests * args.new_tokens

    t = time.perf_counter()
    sequential = [list(Generation(llm.model, p, params)) for p in prompts]
    t_seq = time.perf_counter() - t

    engine = LLMEngine(llm.model, max_batch_tokens=args.max_batch_tokens, enable_prefix_caching=False)
    t = time.perf_counter()
    batched = engine.generate(prompts, params)
    t_batch = time.perf_counter() - t

    same = sum(a == b for a, b in zip(batched, sequential))
    result = {**conditions(), "dtype": args.dtype, "requests": args.requests,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "sequential_tok_s": total / t_seq, "batched_tok_s": total / t_batch, "speedup": t_seq / t_batch,
              "requests_identical": f"{same}/{args.requests}", "preemptions": engine.num_preemptions}
    print(f"{args.requests} requests: sequential {result['sequential_tok_s']:.1f} tok/s, continuous batching "
          f"{result['batched_tok_s']:.1f} tok/s ({result['speedup']:.2f}x); identical outputs {same}/{args.requests}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
