"""Prefix caching: time to first token of a request whose 512-token prefix is cached vs uncached.

Default model, one engine; the "cached" request shares its first 512 tokens (a long system prompt)
with a request served before it, the "uncached" one shares nothing. Side by side in one run.
Writes benchmarks/results/prefix_cache.json.

    python benchmarks/prefix_cache.py [--prefix-tokens 512] [--dtype bfloat16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import conditions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix-tokens", type=int, default=512, help="length of the shared prefix")
    ap.add_argument("--suffix-tokens", type=int, default=16, help="the request's own tokens after the prefix")
    ap.add_argument("--dtype", default="bfloat16", help="float32 or bfloat16")
    ap.add_argument("--repeats", type=int, default=5, help="timed requests per case (median reported)")
    ap.add_argument("--out", default="benchmarks/results/prefix_cache.json", help="where to write the JSON")
    args = ap.parse_args()

    from opengpt import LLM
    from opengpt.engine.engine import LLMEngine
    from opengpt.engine.sampler import SamplingParams

    llm = LLM.load("default", dtype=args.dtype)
    text = Path(__file__).read_text() * 40
    ids = llm.tokenizer.encode(text)
    prefix = ids[: args.prefix_tokens]
    one = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
    engine = LLMEngine(llm.model, max_batch_tokens=4096)

    def ttft(prompt: list[int]) -> float:
        t = time.perf_counter()
        engine.generate([prompt], one)
        return time.perf_counter() - t

    ttft(prefix + ids[-args.suffix_tokens :])  # warm up, and leave the prefix in the cache
    cached, uncached, same = [], [], True
    for r in range(args.repeats):
        suffix = ids[args.prefix_tokens + 50 * r : args.prefix_tokens + 50 * r + args.suffix_tokens]
        cached.append(ttft(prefix + suffix))
        cold = ids[1000 + 600 * r : 1000 + 600 * r + args.prefix_tokens] + suffix  # a prefix never seen
        uncached.append(ttft(cold))
        # a hit must not change the output: compare with an engine that has nothing cached
        fresh = LLMEngine(llm.model, kv_cache_bytes=64 << 20, max_batch_tokens=4096)
        same &= engine.generate([prefix + suffix], one) == fresh.generate([prefix + suffix], one)
    result = {**conditions(), "dtype": args.dtype, "prefix_tokens": args.prefix_tokens,
              "suffix_tokens": args.suffix_tokens, "ttft_cached_ms": 1e3 * statistics.median(cached),
              "ttft_uncached_ms": 1e3 * statistics.median(uncached),
              "speedup": statistics.median(uncached) / statistics.median(cached), "first_token_identical": same}
    print(f"TTFT with a cached {args.prefix_tokens}-token prefix: {result['ttft_cached_ms']:.0f} ms vs "
          f"{result['ttft_uncached_ms']:.0f} ms uncached ({result['speedup']:.1f}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
