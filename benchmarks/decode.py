"""Single-stream decode and prefill speed: opengpt vs transformers `generate`, side by side in one run.

Same weights (the embedded default GGUF, dequantized), same dtype, same threads. Prefill: one
forward over a 512-token prompt. Decode: 128-token prompt, 128 new tokens, greedy, EOS ignored.
opengpt is measured eager and with its compiled decode step (`LLM.load(..., compile=True)`; the
one-time compile is timed separately). Writes benchmarks/results/decode.json and prints the ratios.

    python benchmarks/decode.py [--dtypes float32 bfloat16] [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def timed(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_opengpt(llm, prompt_ids, prefill_ids, new_tokens, repeats, compiled=None):
    from opengpt.engine.generate import Generation
    from opengpt.engine.sampler import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    first = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
    result = {}
    if compiled is not None:
        t = time.perf_counter()
        list(Generation(llm.model, prompt_ids, params, compiled=compiled))
        result["first_run_with_compile_s"] = time.perf_counter() - t

    def run(ids, p, **kw):
        return list(Generation(llm.model, ids, p, compiled=compiled, **kw))

    decode_total = timed(lambda: run(prompt_ids, params), repeats)
    prefill_128 = timed(lambda: run(prompt_ids, first), repeats)
    prefill = timed(lambda: run(prefill_ids, first, prefill_chunk=len(prefill_ids)), repeats)
    return {
        "decode_tok_s": (new_tokens - 1) / (decode_total - prefill_128),
        "prefill_tok_s": len(prefill_ids) / prefill,
        **result,
        "tokens": run(prompt_ids, params),
    }


def bench_transformers(model, prompt_ids, prefill_ids, new_tokens, repeats):
    ids = torch.tensor([prompt_ids])
    pre = torch.tensor([prefill_ids])

    def gen(n, x):
        with torch.inference_mode():
            return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0)

    decode_total = timed(lambda: gen(new_tokens, ids), repeats)
    prefill_128 = timed(lambda: gen(1, ids), repeats)
    prefill = timed(lambda: gen(1, pre), repeats)
    return {
        "decode_tok_s": (new_tokens - 1) / (decode_total - prefill_128),
        "prefill_tok_s": len(prefill_ids) / prefill,
        "tokens": gen(new_tokens, ids)[0, len(prompt_ids):].tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="dtypes to measure")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for the decode measurement")
    ap.add_argument("--prefill-tokens", type=int, default=512, help="prompt length for the prefill measurement")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens to generate")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled opengpt variant")
    ap.add_argument("--quantize", nargs="*", default=[], choices=["int8", "int4"],
                    help="also measure opengpt with these weight-only quantizations (eager and compiled)")
    ap.add_argument("--out", default="benchmarks/results/decode.json", help="where to write the JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from opengpt import LLM
    from opengpt.engine.generate import CompiledDecoder
    from opengpt.weights.default import default_model_path

    path = default_model_path()
    text = Path(__file__).read_text() * 20
    results = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
               "torch": torch.__version__, "transformers": transformers.__version__, "model": path.name, "runs": {}}
    for dtype in args.dtypes:
        llm = LLM.load("default", dtype=dtype)
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        prompt_ids, prefill_ids = ids[: args.prompt_tokens], ids[: args.prefill_tokens]
        # dequantize=True: plain nn.Linear weights in `dtype`, the same weights opengpt computes with
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=getattr(torch, dtype),
            quantization_config=transformers.GgufConfig(dequantize=True)).eval()
        theirs = bench_transformers(hf, prompt_ids, prefill_ids, args.new_tokens, args.repeats)
        ref = theirs.pop("tokens")
        run = {"transformers": theirs}
        variants = {"opengpt_eager": None}
        if not args.no_compile:
            variants["opengpt_compiled"] = CompiledDecoder(llm.model)
        models = {name: llm for name in variants}
        for mode in args.quantize:
            qllm = LLM.load("default", dtype=dtype, quantize=mode)
            models[f"opengpt_{mode}_eager"] = qllm
            variants[f"opengpt_{mode}_eager"] = None
            if not args.no_compile:
                models[f"opengpt_{mode}_compiled"] = qllm
                variants[f"opengpt_{mode}_compiled"] = CompiledDecoder(qllm.model)
        for name, compiled in variants.items():
            ours = bench_opengpt(models[name], prompt_ids, prefill_ids, args.new_tokens, args.repeats, compiled)
            same = sum(a == b for a, b in zip(ours.pop("tokens"), ref))
            ours.update(decode_ratio=ours["decode_tok_s"] / theirs["decode_tok_s"],
                        prefill_ratio=ours["prefill_tok_s"] / theirs["prefill_tok_s"],
                        greedy_tokens_identical_to_transformers=f"{same}/{args.new_tokens}")
            run[name] = ours
            print(f"{dtype} {name}: decode {ours['decode_tok_s']:.1f} tok/s vs transformers {theirs['decode_tok_s']:.1f} "
                  f"({ours['decode_ratio']:.2f}x); prefill {ours['prefill_tok_s']:.0f} vs {theirs['prefill_tok_s']:.0f} "
                  f"({ours['prefill_ratio']:.2f}x); greedy tokens identical {same}/{args.new_tokens}", flush=True)
        results["runs"][dtype] = run
        del llm, hf
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
