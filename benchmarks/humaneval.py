"""HumanEval pass@1 (greedy) of the default model through opengpt and through transformers, same prompts.

opengpt runs all prompts as one batch through the continuous-batching engine
(`opengpt.eval.humaneval.generate_completions`); transformers runs them one at a time with `generate`
on the same GGUF file dequantized to the same weights (as decode.py loads it). Both get the same
token ids (our tokenizer's encoding of the raw prompt), the same greedy decoding and the same stop
handling: transformers' tokens go through our TextStream, which cuts at the first stop sequence
exactly as the engine's requests are cut. Both sets of completions are executed in the sandbox.
The figures must agree; per problem, the JSON says whether the two completions are identical.

    python benchmarks/humaneval.py --limit 10 --max-new-tokens 128   # a quick look
    python benchmarks/humaneval.py                                   # all 164 (transformers: hours on a CPU)
"""

from __future__ import annotations

import argparse
import time

import torch

from common import conditions, write_json


def transformers_completions(hf, llm, problems, max_new_tokens: int, progress: bool = True) -> list[str]:
    """Greedy completions by transformers, one prompt at a time, cut by our TextStream (the engine's cut)."""
    from tqdm.auto import tqdm
    from transformers import StoppingCriteria, StoppingCriteriaList

    from opengpt.api import TextStream
    from opengpt.eval.humaneval import STOP

    eos = sorted(llm.tokenizer.eos_token_ids)

    class StopAtStopString(StoppingCriteria):
        def __init__(self, stream: TextStream):
            self.stream, self.text, self.stopped = stream, "", False

        def __call__(self, input_ids, scores, **kwargs):
            tok = int(input_ids[0, -1])
            if tok not in eos and not self.stopped:
                piece, self.stopped = self.stream.push(tok)
                self.text += piece
            return torch.tensor([self.stopped])

    out = []
    for p in tqdm(problems, desc="transformers", unit="problem", disable=not progress):
        ids = llm.tokenizer.encode(p["prompt"])
        stop = StopAtStopString(TextStream(llm.tokenizer, ids, STOP))
        x = torch.tensor([ids])
        with torch.inference_mode():
            hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                        eos_token_id=eos, pad_token_id=eos[0], stopping_criteria=StoppingCriteriaList([stop]))
        out.append(stop.text if stop.stopped else stop.text + stop.stream.flush())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="only the first N problems (default: all 164)")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="most new tokens per completion")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds each program may run in the sandbox")
    ap.add_argument("--out", default="benchmarks/results/humaneval.json", help="where to write the JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from opengpt import LLM
    from opengpt.eval.humaneval import check_all, generate_completions, load_problems
    from opengpt.weights.default import default_model_path

    problems = load_problems()[: args.limit] if args.limit else load_problems()
    path = default_model_path()
    results = {"conditions": {**conditions(), "transformers": transformers.__version__}, "model": path.name,
               "dtype": args.dtype, "problems": len(problems), "max_new_tokens": args.max_new_tokens}

    llm = LLM.load("default", dtype=args.dtype)
    t = time.perf_counter()
    ours = [c[0] for c in generate_completions(llm, problems, n=1, temperature=0.0,
                                               max_new_tokens=args.max_new_tokens, progress=True)]
    ours_s = time.perf_counter() - t

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=getattr(torch, args.dtype),
        quantization_config=transformers.GgufConfig(dequantize=True)).eval()
    t = time.perf_counter()
    theirs = transformers_completions(hf, llm, problems, args.max_new_tokens)
    theirs_s = time.perf_counter() - t

    t = time.perf_counter()
    checks = check_all([(p, c) for p, c in zip(problems, ours)] + [(p, c) for p, c in zip(problems, theirs)],
                       timeout=args.timeout, progress=True)
    execution_s = time.perf_counter() - t
    ours_ok, theirs_ok = checks[: len(problems)], checks[len(problems):]

    per_problem = [{"task_id": p["task_id"], "identical_completions": a == b, "opengpt_passed": ra.passed,
                    "transformers_passed": rb.passed, "opengpt_completion": a, "transformers_completion": b}
                   for p, a, b, ra, rb in zip(problems, ours, theirs, ours_ok, theirs_ok)]
    identical = sum(r["identical_completions"] for r in per_problem)
    same_verdict = sum(r["opengpt_passed"] == r["transformers_passed"] for r in per_problem)
    results.update({
        "pass@1": {"opengpt": sum(r.passed for r in ours_ok) / len(problems),
                   "transformers": sum(r.passed for r in theirs_ok) / len(problems)},
        "passed": {"opengpt": sum(r.passed for r in ours_ok), "transformers": sum(r.passed for r in theirs_ok)},
        "identical_completions": f"{identical}/{len(problems)}",
        "same_verdict": f"{same_verdict}/{len(problems)}",
        "seconds": {"opengpt_generation_batched": ours_s, "transformers_generation_one_by_one": theirs_s,
                    "sandbox_execution_both": execution_s},
        "per_problem": per_problem,
    })
    print(f"pass@1 greedy over {len(problems)} problems: opengpt {results['pass@1']['opengpt']:.3f}, transformers "
          f"{results['pass@1']['transformers']:.3f}; identical completions {identical}/{len(problems)}, same verdict "
          f"{same_verdict}/{len(problems)}; generation {ours_s:.0f}s (opengpt, batched) vs {theirs_s:.0f}s "
          f"(transformers, one by one)")
    write_json(results, args.out)


if __name__ == "__main__":
    main()
